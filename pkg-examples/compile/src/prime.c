/* prime N: print the Nth prime number (default: the 1000th). */
#include <stdio.h>
#include <stdlib.h>

static int is_prime(unsigned long n)
{
    if (n < 2)
        return 0;
    for (unsigned long d = 2; d * d <= n; d++)
        if (n % d == 0)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    long want = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    if (want < 1) {
        fprintf(stderr, "usage: %s [N]  (N >= 1: print the Nth prime)\n", argv[0]);
        return 2;
    }
    long found = 0;
    unsigned long n = 1;
    while (found < want)
        if (is_prime(++n))
            found++;
    printf("prime number %ld is %lu\n", want, n);
    return 0;
}
