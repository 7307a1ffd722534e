/* Built with -fno-semantic-interposition (as CPython is): an exported
 * function called directly from inside its object, whose callers keep
 * values in call-clobbered registers across the call (IPA-RA). */
#define NOINLINE __attribute__((noinline, noclone))

NOINLINE int pub_clamp(int qty)
{
    return qty > 1000 ? 1000 : qty < 0 ? 0 : qty;
}

long pub_line_total(int price, int qty, int discount)
{
    int q = pub_clamp(qty);
    long gross = (long)price * q;
    int d = pub_clamp(discount);
    return gross + (long)price * (q + d) / 7 - q * d;
}
