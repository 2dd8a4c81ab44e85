"""Secure aggregation: the aggregator learns the sum of the workers' vectors and nothing else.

The protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017), for an honest-but-curious aggregator, one instance per round:

1. **Advertise keys.** Client ``i`` makes two X25519 key pairs: ``c`` (encrypts the shares it
   sends its peers) and ``s`` (agrees the pairwise masks). The public keys reach every client.
2. **Share keys.** Client ``i`` draws a self-mask seed ``b_i`` and splits ``b_i`` and its mask
   private key ``s_i`` into ``n`` Shamir shares (threshold ``t``), one pair per peer, each
   encrypted (ChaCha20-Poly1305 under the ``c`` agreement) so the aggregator, which routes them,
   cannot read them.
3. **Masked input.** Client ``i`` sends ``y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) -
   sum_{j<i} PRG(s_ij)`` in the ring Z_(2^64), ``x_i`` being its fixed-point vector and ``s_ij``
   the X25519 agreement of ``s_i`` with ``s_j``. The pairwise masks cancel in the sum.
4. **Unmask.** The aggregator names the survivors (clients whose ``y`` arrived). Each survivor
   reveals, per peer, a share of ``b_j`` (survivor ``j``) or of ``s_j`` (dropped ``j``), never
   both. With ``t`` shares the aggregator removes every self mask and the dropped clients'
   pairwise masks still inside the survivors' inputs, and holds the sum of the survivors' ``x``.

The functions and classes here are pure (bytes and numpy arrays in and out); the federated round
(:mod:`workers.training.federated`) carries their messages over torch.distributed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRAC_BITS = 24
"""Fixed-point fraction bits: a value x travels as round(x * 2^24) in Z_(2^64)."""
MAX_ABS = float(2 ** (56 - FRAC_BITS))
"""Largest |x| quantize accepts: 2^8 = 256 summed maxima still fit the signed 64-bit range."""
PRIME = 2**521 - 1
"""The Shamir field (a Mersenne prime above every 32-byte secret)."""
KEY_BYTES = 32
SHARE_BYTES = 66  # a field element < 2^521
PUBLIC_BYTES = 2 * KEY_BYTES  # c public key || s public key
SHARE_PLAIN = 4 + 2 * SHARE_BYTES  # sender, receiver (2 bytes each) || share of s || share of b
CIPHER_BYTES = SHARE_PLAIN + 16  # + Poly1305 tag


class SecAggError(RuntimeError):
    """The protocol cannot complete (too few survivors, a bad message, a value out of range)."""


# --------------------------------------------------------------------------- fixed point

def quantize(x: np.ndarray) -> np.ndarray:
    """Real vector -> ring elements (uint64, two's complement of round(x * 2^FRAC_BITS))."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise SecAggError("the update holds NaN or inf values; it cannot be securely aggregated")
    if x.size and float(np.abs(x).max()) > MAX_ABS:
        raise SecAggError(f"an update value of {float(np.abs(x).max()):.3g} is beyond the fixed-point range "
                          f"(|x| <= {MAX_ABS:g})")
    return np.rint(x * (1 << FRAC_BITS)).astype(np.int64).view(np.uint64)


def dequantize(q: np.ndarray) -> np.ndarray:
    """Ring elements -> real vector (the inverse of quantize, also for sums of quantized vectors)."""
    return np.asarray(q, dtype=np.uint64).view(np.int64).astype(np.float64) / (1 << FRAC_BITS)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random ring elements: the ChaCha20 key stream under the 32-byte ``seed``."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)), dtype=np.uint64).copy()


# --------------------------------------------------------------------------- keys and shares

def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte secret both ends derive (X25519, then HKDF-SHA256 bound to ``purpose``)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(shared)


def shamir_split(secret: int, n: int, t: int) -> list[tuple[int, int]]:
    """``n`` shares (x = 1..n) of ``secret`` (< PRIME); any ``t`` of them rebuild it, fewer tell nothing."""
    if not 1 <= t <= n:
        raise SecAggError(f"threshold {t} must be between 1 and the {n} shares")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_join(shares: list[tuple[int, int]]) -> int:
    """The secret from ``t`` or more shares: Lagrange interpolation at 0."""
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def _nonce(sender: int, receiver: int) -> bytes:
    return sender.to_bytes(6, "big") + receiver.to_bytes(6, "big")


def _mask_sign(i: int, j: int) -> int:
    return 1 if j > i else -1


# --------------------------------------------------------------------------- the parties

@dataclass
class Client:
    """One worker's side of one protocol instance. ``index`` in 0..n-1."""

    index: int
    n: int
    threshold: int
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES), repr=False)
    _keys: list[bytes] = field(default_factory=list, repr=False)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)  # peer -> (share of s, share of b)
    _revealed: bool = False

    def advertise(self) -> bytes:
        """Round 1: this client's public keys (c || s)."""
        return public_bytes(self._c) + public_bytes(self._s)

    def share_keys(self, keys: list[bytes]) -> list[bytes]:
        """Round 2: given every client's advertised keys, one ciphertext per client (index j)
        holding this client's shares of ``s`` and ``b`` for j."""
        if len(keys) != self.n or any(len(k) != PUBLIC_BYTES for k in keys):
            raise SecAggError(f"expected {self.n} public keys of {PUBLIC_BYTES} bytes")
        if len(set(keys)) != self.n:
            raise SecAggError("two clients advertised the same keys")
        self._keys = list(keys)
        s_shares = shamir_split(int.from_bytes(private_bytes(self._s), "big"), self.n, self.threshold)
        b_shares = shamir_split(int.from_bytes(self._b, "big"), self.n, self.threshold)
        out = []
        for j in range(self.n):
            plain = (self.index.to_bytes(2, "big") + j.to_bytes(2, "big")
                     + s_shares[j][1].to_bytes(SHARE_BYTES, "big") + b_shares[j][1].to_bytes(SHARE_BYTES, "big"))
            aead = ChaCha20Poly1305(agree(self._c, keys[j][:KEY_BYTES], b"secagg share encryption"))
            out.append(aead.encrypt(_nonce(self.index, j), plain, None))
        return out

    def masked_input(self, x: np.ndarray, received: list[bytes | None]) -> np.ndarray:
        """Round 3: store the shares peers sent this client (``received[j]`` from client j, None
        when j dropped before sending) and mask the ring vector ``x``."""
        for j, ct in enumerate(received):
            if ct is None:
                continue
            aead = ChaCha20Poly1305(agree(self._c, self._keys[j][:KEY_BYTES], b"secagg share encryption"))
            plain = aead.decrypt(_nonce(j, self.index), ct, None)
            if int.from_bytes(plain[:2], "big") != j or int.from_bytes(plain[2:4], "big") != self.index:
                raise SecAggError(f"a share from client {j} names the wrong parties")
            self._held[j] = (int.from_bytes(plain[4:4 + SHARE_BYTES], "big"),
                             int.from_bytes(plain[4 + SHARE_BYTES:], "big"))
        y = np.asarray(x, dtype=np.uint64) + prg(self._b, len(x))
        for j in self._held:
            if j == self.index:
                continue
            mask = prg(agree(self._s, self._keys[j][KEY_BYTES:], b"secagg pairwise mask"), len(x))
            y = y + mask if _mask_sign(self.index, j) > 0 else y - mask
        return y

    def unmask(self, survivors: list[int]) -> dict[int, tuple[str, int]]:
        """Round 4: per peer this client holds shares of, ``("b", share)`` for a survivor or
        ``("s", share)`` for a dropped client. Answered once: a second, different survivor list
        could reveal both secrets of one client."""
        if self._revealed:
            raise SecAggError("this client already answered the unmasking round")
        if len(survivors) < self.threshold:
            raise SecAggError(f"only {len(survivors)} clients survived; unmasking needs {self.threshold}")
        self._revealed = True
        alive = set(survivors)
        return {j: ("b", b) if j in alive else ("s", s) for j, (s, b) in self._held.items()}


@dataclass
class Server:
    """The aggregator's side: routes the messages and removes the masks from the sum."""

    n: int
    threshold: int
    keys: list[bytes] = field(default_factory=list)

    def route(self, ciphertexts: dict[int, list[bytes]]) -> list[list[bytes | None]]:
        """Round 2 -> 3: ``ciphertexts[i][j]`` from client i to j becomes ``received[j][i]``
        (None from clients that sent nothing)."""
        return [[ciphertexts[i][j] if i in ciphertexts else None for i in range(self.n)] for j in range(self.n)]

    def unmask(self, masked: dict[int, np.ndarray], shared: list[int],
               reveals: dict[int, dict[int, tuple[str, int]]]) -> np.ndarray:
        """The sum of the survivors' vectors. ``masked``: the survivors' masked inputs;
        ``shared``: the clients that took part in round 2 (their pairwise masks are in the
        survivors' inputs); ``reveals``: each answering survivor's round-4 shares."""
        survivors = sorted(masked)
        if len(reveals) < self.threshold:
            raise SecAggError(f"{len(reveals)} survivors answered the unmasking; {self.threshold} are needed")
        dropped = [j for j in shared if j not in masked]
        total = np.zeros_like(next(iter(masked.values())), dtype=np.uint64)
        for y in masked.values():
            total = total + y
        d = len(total)
        for j in survivors:
            b = self._join(j, "b", reveals)
            total = total - prg(b.to_bytes(KEY_BYTES, "big"), d)
        for j in dropped:
            s_j = X25519PrivateKey.from_private_bytes(self._join(j, "s", reveals).to_bytes(KEY_BYTES, "big"))
            for i in survivors:
                mask = prg(agree(s_j, self.keys[i][KEY_BYTES:], b"secagg pairwise mask"), d)
                # survivor i added sign(i, j) * mask; take it out
                total = total - mask if _mask_sign(i, j) > 0 else total + mask
        return total

    def _join(self, j: int, kind: str, reveals: dict[int, dict[int, tuple[str, int]]]) -> int:
        shares = [(holder + 1, val) for holder, got in reveals.items() if j in got
                  for k, val in [got[j]] if k == kind]
        if len(shares) < self.threshold:
            raise SecAggError(f"only {len(shares)} shares of client {j}'s {'self mask' if kind == 'b' else 'key'} "
                              f"arrived; {self.threshold} are needed")
        return shamir_join(shares[: self.threshold])


def default_threshold(n: int) -> int:
    """Shares needed to unmask: a majority of the clients (n // 2 + 1), as SecAgg advises."""
    return n // 2 + 1


def run_local(vectors: list[np.ndarray], drop_after_sharing: frozenset[int] = frozenset(),
              threshold: int | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The whole protocol in one process (tests and benchmarks): (the unmasked sum of the
    survivors' ring vectors, the masked vectors the aggregator received). Clients in
    ``drop_after_sharing`` vanish after round 2, mid-round."""
    n = len(vectors)
    t = threshold or default_threshold(n)
    clients = [Client(i, n, t) for i in range(n)]
    server = Server(n, t)
    server.keys = [c.advertise() for c in clients]
    routed = server.route({c.index: c.share_keys(server.keys) for c in clients})
    masked = {c.index: c.masked_input(vectors[c.index], routed[c.index])
              for c in clients if c.index not in drop_after_sharing}
    survivors = sorted(masked)
    reveals = {i: clients[i].unmask(survivors) for i in survivors}
    return server.unmask(masked, list(range(n)), reveals), masked
