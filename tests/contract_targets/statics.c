/* Static functions and variables a C patch module reaches through
 * HP_SYMBOL (klp relocations). */
#define NOINLINE __attribute__((noinline, noclone))

static int st_calls;

static NOINLINE long st_scale(long x)
{
    st_calls++;
    return x * 10;
}

long st_use_scale(long x)
{
    return st_scale(x) + 1;
}

int st_calls_so_far(void)
{
    return st_calls;
}
