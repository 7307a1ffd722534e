/*
 * The live patch for libshop's total_cents(): the discount in integer
 * arithmetic, rounded to the nearest cent (halves up).
 *
 *     hotpatch build fix.c -o fix.so
 *     hotpatch load PID fix.so
 */
#include <hotpatch.h>

static long total_cents_fixed(long unit_cents, long quantity)
{
    long total = unit_cents * quantity;
    if (quantity >= 10)
        total = (total * 9 + 5) / 10;
    return total;
}

static struct hp_func funcs[] = {
    { .old_name = "total_cents", .new_func = total_cents_fixed },
    { }
};

static struct hp_object objs[] = {
    { .name = "libshop.so", .funcs = funcs },
    { }
};

static struct hp_patch patch = { .name = "round-total", .objs = objs };

HP_PATCH(patch);
