"""Robust Shamir reconstruction: rebuild a secret from more than t shares when some are lies.

Why it is needed: the coordinator rebuilds each device's self-mask seed (and a dropped
device's mask key) from the shares the survivors reveal. Interpolating the first t shares
trusts every one of them, so one device revealing a wrong value silently changes the
secret and with it the published aggregate. Here a secret counts only once `verify`
accepts it (the caller checks a hash commitment or a public key), and the shares that
disagree with the accepted polynomial are reported, so the caller can name the liars.

Shamir shares of one secret are a Reed-Solomon codeword: the values at x_1..x_R of one
polynomial f of degree < t, with f(0) the secret. Decoding, in order of cost:

1. *Check*: interpolate the first t shares and evaluate that polynomial at every other x
   (weights precomputed once per set of points, reused for every secret the same devices
   revealed). All agree and the secret verifies: done, nobody lied.
2. *Berlekamp-Welch*: when up to e = floor((R - t) / 2) shares are wrong, one linear system
   over GF(p) finds f (Q = f E, with E vanishing on the wrong points). O(R^3) field
   operations, whatever the number of liars within e.
3. *Bounded search*: interpolate t-subsets until one's secret verifies; the shares off that
   polynomial are the lies. For when R < t + 2 x liars (few spare shares, as in a small
   round with a drop-out, or many liars). At most `max_candidates` subsets are tried.

A subset holding a wrong share rebuilds a wrong secret, which `verify` refuses (a hash
commitment or a public key binds the secret), so the secret accepted is the dealt one
whenever at least t responders told the truth and the search reaches such a subset. The
shares named are exactly the lies while at most e responders lie (unique decoding); beyond
that, colluding liars crafting their values together could make an honest share look like
the odd one out, though never change the secret. When more than t shares all agree
and the secret does not verify, it is the dealer's polynomial that is wrong
(`Decoding.dealt_wrong_secret`): no responder lied.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from edge_runtime.secagg.shamir import PRIME

DEFAULT_MAX_CANDIDATES = 4096
"""t-subsets the bounded search tries per secret (each O(t^2) field operations and one
`verify`): all of them while C(R, t) is no larger (any round of up to 14 responders),
else this many drawn at random; with R = 20, t = 11 and 5 liars (one more than
Berlekamp-Welch corrects) an all-honest subset turns up after about 125 draws."""


@dataclass(frozen=True)
class Decoding:
    """What decoding one secret's shares found."""

    secret: int | None
    """f(0) of the accepted polynomial, or None when no candidate verified."""
    wrong_points: frozenset[int]
    """x of each share that disagrees with the accepted polynomial (empty when none)."""
    dealt_wrong_secret: bool = False
    """More than t shares lie on one polynomial whose secret does not verify: the owner
    shared something other than what it committed to (or advertised)."""

    def __post_init__(self) -> None:
        if self.secret is None and self.wrong_points:
            raise ValueError("wrong points are only known for an accepted polynomial")


class Interpolant:
    """Lagrange weights of the polynomial through `basis` (t points), evaluated at 0 and at
    each of `others`: a secret and a check of the other shares cost O(R t) products."""

    def __init__(self, basis: Sequence[int], others: Sequence[int]) -> None:
        if len(set(basis)) != len(basis) or set(basis) & set(others):
            raise ValueError("basis points must be distinct and not among the others")
        self.basis = tuple(basis)
        self.others = tuple(others)
        denominators = []
        for j, x_j in enumerate(self.basis):
            product = 1
            for m, x_m in enumerate(self.basis):
                if m != j:
                    product = product * (x_j - x_m) % PRIME
            denominators.append(pow(product, -1, PRIME))
        self._at_zero = self._weights(0, denominators)
        self._at_others = [self._weights(x, denominators) for x in self.others]

    def _weights(self, x: int, inverse_denominators: list[int]) -> list[int]:
        """l_j(x) for every basis point j: prefix x suffix products of (x - x_m), m != j."""
        differences = [(x - x_m) % PRIME for x_m in self.basis]
        prefix = [1]
        for difference in differences[:-1]:
            prefix.append(prefix[-1] * difference % PRIME)
        weights = [0] * len(differences)
        suffix = 1
        for j in range(len(differences) - 1, -1, -1):
            weights[j] = prefix[j] * suffix % PRIME * inverse_denominators[j] % PRIME
            suffix = suffix * differences[j] % PRIME
        return weights

    def secret(self, values: Mapping[int, int]) -> int:
        return _dot(self._at_zero, [values[x] for x in self.basis])

    def disagreeing(self, values: Mapping[int, int]) -> set[int]:
        """The other points whose share is not the polynomial's value there."""
        ys = [values[x] for x in self.basis]
        return {
            x
            for x, weights in zip(self.others, self._at_others, strict=True)
            if _dot(weights, ys) != values[x] % PRIME
        }


def _dot(weights: Sequence[int], values: Sequence[int]) -> int:
    return sum(w * y for w, y in zip(weights, values, strict=True)) % PRIME


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        value = (value * x + coefficient) % PRIME
    return value


def _solve(rows: list[list[int]], num_unknowns: int) -> list[int] | None:
    """One solution of an augmented linear system over GF(p) (free unknowns 0), or None."""
    pivots: list[int] = []
    rank = 0
    for column in range(num_unknowns):
        pivot = next((i for i in range(rank, len(rows)) if rows[i][column]), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        inverse = pow(rows[rank][column], -1, PRIME)
        rows[rank] = [value * inverse % PRIME for value in rows[rank]]
        for i, row in enumerate(rows):
            if i != rank and row[column]:
                factor = row[column]
                rows[i] = [(a - factor * b) % PRIME for a, b in zip(row, rows[rank], strict=True)]
        pivots.append(column)
        rank += 1
        if rank == len(rows):
            break
    if any(row[num_unknowns] for row in rows[rank:]):
        return None  # inconsistent: more wrong shares than the system allows for
    solution = [0] * num_unknowns
    for row, column in zip(rows, pivots, strict=False):
        solution[column] = row[num_unknowns]
    return solution


def _divide(numerator: list[int], monic_divisor: list[int]) -> list[int] | None:
    """numerator / divisor (coefficients low to high, divisor monic), None if not exact."""
    remainder = list(numerator)
    degree = len(monic_divisor) - 1
    quotient = [0] * max(1, len(remainder) - degree)
    for power in range(len(remainder) - 1, degree - 1, -1):
        factor = remainder[power]
        if factor:
            quotient[power - degree] = factor
            for i, coefficient in enumerate(monic_divisor):
                remainder[power - degree + i] = (
                    remainder[power - degree + i] - factor * coefficient
                ) % PRIME
    return quotient if not any(remainder[:degree]) else None


def berlekamp_welch(shares: Mapping[int, int], threshold: int, max_errors: int) -> list[int] | None:
    """Coefficients (low to high) of the polynomial of degree < t that agrees with all but at
    most `max_errors` shares, or None; needs len(shares) >= t + 2 max_errors.

    Unknowns: Q of degree < t + e and a monic E of degree e with Q(x) = y E(x) at every
    share; any solution has Q = f E when at most e shares are wrong, so f = Q / E."""
    points = sorted(shares)
    if max_errors < 1 or len(points) < threshold + 2 * max_errors:
        raise ValueError(
            f"Berlekamp-Welch corrects e >= 1 errors with at least t + 2e = "
            f"{threshold + 2 * max_errors} shares; got {len(points)} and e = {max_errors}"
        )
    q_terms = threshold + max_errors
    rows = []
    for x in points:
        y = shares[x] % PRIME
        powers = [pow(x, i, PRIME) for i in range(q_terms)]
        rows.append(
            powers
            + [(-y * powers[i]) % PRIME for i in range(max_errors)]
            + [y * pow(x, max_errors, PRIME) % PRIME]
        )
    solution = _solve(rows, q_terms + max_errors)
    if solution is None:
        return None
    return _divide(solution[:q_terms], solution[q_terms:] + [1])  # t coefficients


def _candidate_bases(points: Sequence[int], threshold: int, most: int) -> Iterator[list[int]]:
    """Every t-subset while there are at most `most`, else `most` drawn at random (from a
    fixed seed, so a replayed round tries the same ones: any order finds an honest subset
    as fast, and a liar cannot make a subset holding its share verify)."""
    if math.comb(len(points), threshold) <= most:
        for basis in combinations(points, threshold):
            yield list(basis)
        return
    draws = random.Random(len(points) * 4099 + threshold)  # noqa: S311 - not a secret
    for _ in range(most):
        yield sorted(draws.sample(list(points), threshold))


class ShareDecoder:
    """Decodes many secrets revealed by the same devices (one per owner), caching the
    interpolation weights of each set of points it meets."""

    def __init__(self, threshold: int, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.max_candidates = max_candidates
        self._interpolants: dict[tuple[tuple[int, ...], tuple[int, ...]], Interpolant] = {}

    def _interpolant(self, basis: Sequence[int], others: Sequence[int], cache: bool) -> Interpolant:
        key = (tuple(basis), tuple(others))
        if key in self._interpolants:
            return self._interpolants[key]
        interpolant = Interpolant(basis, others)
        if cache:  # the sets every secret meets; not the search's one-off candidates
            self._interpolants[key] = interpolant
        return interpolant

    def _check(
        self,
        values: Mapping[int, int],
        trusted: Sequence[int],
        suspects: Sequence[int],
        cache: bool = True,
    ) -> tuple[int, set[int], set[int]]:
        """(secret of the polynomial through trusted[:t], trusted points off it, suspects
        off it)."""
        t = self.threshold
        interpolant = self._interpolant(trusted[:t], [*trusted[t:], *suspects], cache)
        off = interpolant.disagreeing(values)
        return interpolant.secret(values), off - set(suspects), off & set(suspects)

    def decode(
        self,
        shares: Mapping[int, int],
        verify: Callable[[int], bool],
        suspects: frozenset[int] = frozenset(),
    ) -> Decoding:
        """Find the secret that `verify` accepts and the shares that disagree with it.

        `suspects`: points found lying about another secret. They are left out of a first,
        cheap attempt (and reported only if their share here is wrong too); if that
        attempt fails, every share takes part again."""
        t = self.threshold
        points = sorted(shares)
        if len(points) < t:
            raise ValueError(f"need {t} shares to reconstruct, got {len(points)}")
        trusted = [x for x in points if x not in suspects]
        if suspects & set(points) and len(trusted) >= t:
            secret, off_trusted, off_suspects = self._check(
                shares, trusted, sorted(suspects & set(points))
            )
            if not off_trusted and verify(secret):
                return Decoding(secret, frozenset(off_suspects))
        secret, off, _ = self._check(shares, points, [])
        if not off:
            if verify(secret):
                return Decoding(secret, frozenset())
            # Every share on one polynomial, so no subset rebuilds another secret. With more
            # than t that is the dealer's polynomial (with exactly t, a liar's is as likely).
            return Decoding(None, frozenset(), dealt_wrong_secret=len(points) > t)
        max_errors = (len(points) - t) // 2
        if max_errors >= 1:
            coefficients = berlekamp_welch(shares, t, max_errors)
            if coefficients is not None and verify(coefficients[0]):
                wrong = {x for x in points if _evaluate(coefficients, x) != shares[x] % PRIME}
                if len(wrong) <= max_errors:
                    return Decoding(coefficients[0], frozenset(wrong))
        for basis in _candidate_bases(points, t, self.max_candidates):
            secret = Interpolant(basis, ()).secret(shares)
            if verify(secret):
                rest = [x for x in points if x not in basis]
                return Decoding(secret, frozenset(Interpolant(basis, rest).disagreeing(shares)))
        return Decoding(None, frozenset())
