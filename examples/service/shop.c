/*
 * libshop: the native core of the example service (service.py calls it
 * through ctypes).
 *
 * The bug: the volume discount is computed in floating point and truncated,
 * so a total that should round to the nearest cent loses one cent whenever
 * its fraction is .5 or more -- and sometimes when it is exact, since 0.9
 * is not exactly representable (19990 * 0.9 = 17990.999...).
 */

/* Total in cents of `quantity` items at `unit_cents` each: 10% off from
 * ten items on, rounded to the nearest cent. */
long total_cents(long unit_cents, long quantity)
{
    long total = unit_cents * quantity;
    if (quantity >= 10)
        total = (long)(total * 0.9);      /* truncates instead of rounding */
    return total;
}
