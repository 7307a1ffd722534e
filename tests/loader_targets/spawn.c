/* dlopen/dlclose from native threads that have no Python state. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>

static void *opened;
static const char *path_to_open;

static void *open_it(void *unused) { opened = dlopen(path_to_open, RTLD_NOW); return 0; }

/* dlopen `path` in a new native thread and wait for it: the handle. */
void *native_dlopen(const char *path)
{
    pthread_t t;
    path_to_open = path;
    pthread_create(&t, 0, open_it, 0);
    pthread_join(t, 0);
    return opened;
}

static void *close_it(void *handle) { dlclose(handle); return 0; }

void native_dlclose(void *handle)
{
    pthread_t t;
    pthread_create(&t, 0, close_it, handle);
    pthread_join(t, 0);
}

/* A native thread that dlopens and dlcloses `path` `n` times, or until told
 * to stop: bounded work, whatever the machine's load. */
static volatile int running;
static volatile long cycles, wanted;
static pthread_t hammer;

static void *hammer_loop(void *path)
{
    while (running && cycles < wanted) {
        void *h = dlopen(path, RTLD_NOW);
        if (h)
            dlclose(h);
        __atomic_add_fetch(&cycles, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

void hammer_start(const char *path, long n)
{
    running = 1;
    wanted = n;
    pthread_create(&hammer, 0, hammer_loop, (void *)path);
}
long hammer_stop(void) { pthread_join(hammer, 0); running = 0; return cycles; }
long hammer_cycles(void) { return __atomic_load_n(&cycles, __ATOMIC_RELAXED); }
