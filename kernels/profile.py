"""Per-model calibration profile: the transform the codec applies before quantisation.

For every (layer, K/V, head group) the profile holds a mean and a decorrelating basis fitted once on
real text (PCA in a distortion-weighted space, see ``fit_profile``), plus per-(layer, K/V) step
multipliers (layer sensitivity) and the rotary-embedding frequencies needed to take RoPE off the keys.
It is a versioned artifact: serialised with safetensors (no pickle), identified by the SHA-256 of its
canonical content, referenced by that digest from every chunk, and checked on decode.

The inverse transform is stored as 16-bit integers with a power-of-two scale, so that decoding is
exact integer arithmetic and bit-identical on CPU and GPU (docs/format.md, "Reconstruction").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kvwire.errors import InvalidInputError, ProfileMismatchError

PROFILE_FORMAT = "kvwire-profile"
PROFILE_VERSION = 1
BASIS_BITS = 14  # |basis_int| < 2**14: keeps every decode accumulation exact in float64
MAX_GROUP_DIM = 8192
# Value bounds, far wider than any calibration gives (layer weights ~0.01..10, RoPE attention scaling
# ~1, means ~10), and narrow enough that every level step times a layer weight has a chunk step code
# and that reconstruction stays finite in float32 (docs/format.md, "Reconstruction").
MIN_LAYER_WEIGHT, MAX_LAYER_WEIGHT = 2.0**-40, 2.0**40
MIN_ROPE_SCALING, MAX_ROPE_SCALING = 1 / 16, 16.0
MAX_ABS_MEAN = 2.0**100


@dataclass(frozen=True, eq=False)
class CalibrationProfile:
    """Transform parameters for one model. Shapes: L layers, G head groups, d = heads_per_group * D.

    mean: float32 [L, 2, G, d]; basis: int16 [L, 2, G, d, d] (row c = output of component c);
    basis_exp: int8 [L, 2, G] (basis = basis_int * 2**-basis_exp); layer_weight: float32 [L, 2];
    inv_freq: float32 [rotary_dim // 2] or empty when the model has no rotary embedding.
    """

    model_fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    heads_per_group: int
    mean: np.ndarray
    basis: np.ndarray
    basis_exp: np.ndarray
    layer_weight: np.ndarray
    inv_freq: np.ndarray
    rope_scaling: float = 1.0
    sink_tokens: int = 4
    notes: str = ""
    digest: str = field(default="", compare=False)

    @property
    def groups(self) -> int:
        return self.kv_heads // self.heads_per_group

    @property
    def group_dim(self) -> int:
        return self.heads_per_group * self.head_dim

    @property
    def has_rope(self) -> bool:
        return self.inv_freq.size > 0

    def basis_float(self) -> np.ndarray:
        """The exact inverse transform as float64 [L, 2, G, d, d]."""
        return np.ldexp(self.basis.astype(np.float64), -self.basis_exp.astype(np.int32)[..., None, None])

    def forward_matrix(self) -> np.ndarray:
        """Encoder transform (inverse of the stored basis), float64 [L, 2, G, d, d].

        Raises InvalidInputError for a singular basis (a damaged profile; ``fit_profile`` never makes one).
        """
        try:
            return np.linalg.inv(self.basis_float())
        except np.linalg.LinAlgError as exc:
            raise InvalidInputError(f"profile basis is not invertible: {exc}") from exc

    def to_bytes(self) -> bytes:
        meta = {
            "format": PROFILE_FORMAT,
            "version": str(PROFILE_VERSION),
            "config": json.dumps(
                {
                    "model_fingerprint": self.model_fingerprint,
                    "layers": self.layers,
                    "kv_heads": self.kv_heads,
                    "head_dim": self.head_dim,
                    "heads_per_group": self.heads_per_group,
                    "rope_scaling": self.rope_scaling,
                    "sink_tokens": self.sink_tokens,
                    "notes": self.notes,
                },
                sort_keys=True,
            ),
        }
        tensors: dict[str, np.ndarray] = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
            "basis": np.ascontiguousarray(self.basis, dtype=np.int16),
            "basis_exp": np.ascontiguousarray(self.basis_exp, dtype=np.int8),
            "layer_weight": np.ascontiguousarray(self.layer_weight, dtype=np.float32),
            "inv_freq": np.ascontiguousarray(self.inv_freq, dtype=np.float32),
        }
        return bytes(st_save(tensors, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> CalibrationProfile:
        """Parse and validate a serialised profile; raises InvalidInputError on anything malformed."""
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
            if meta.get("format") != PROFILE_FORMAT:
                raise InvalidInputError("not a kvwire calibration profile")
            if meta.get("version") != str(PROFILE_VERSION):
                raise InvalidInputError(f"unsupported profile version {meta.get('version')!r}")
            cfg = json.loads(meta["config"])
            profile = cls(
                model_fingerprint=str(cfg["model_fingerprint"]),
                layers=int(cfg["layers"]),
                kv_heads=int(cfg["kv_heads"]),
                head_dim=int(cfg["head_dim"]),
                heads_per_group=int(cfg["heads_per_group"]),
                mean=tensors["mean"],
                basis=tensors["basis"],
                basis_exp=tensors["basis_exp"],
                layer_weight=tensors["layer_weight"],
                inv_freq=tensors["inv_freq"],
                rope_scaling=float(cfg["rope_scaling"]),
                sink_tokens=int(cfg["sink_tokens"]),
                notes=str(cfg.get("notes", "")),
            )
        except InvalidInputError:
            raise
        except Exception as exc:  # safetensors, json and key errors all mean a malformed profile
            raise InvalidInputError(f"malformed calibration profile: {exc}") from exc
        profile.validate()
        return with_digest(profile)

    def validate(self) -> None:
        """Check shapes, ranges and invertibility; raises InvalidInputError."""
        if (
            min(self.layers, self.kv_heads, self.head_dim, self.heads_per_group) < 1
            or self.kv_heads % self.heads_per_group
        ):
            raise InvalidInputError("profile layout is inconsistent")
        L, G, d = self.layers, self.groups, self.group_dim
        if d > MAX_GROUP_DIM:
            raise InvalidInputError(f"profile group dimension {d} exceeds {MAX_GROUP_DIM}")
        expect = {
            "mean": (L, 2, G, d),
            "basis": (L, 2, G, d, d),
            "basis_exp": (L, 2, G),
            "layer_weight": (L, 2),
        }
        dtypes = {"mean": np.float32, "basis": np.int16, "basis_exp": np.int8, "layer_weight": np.float32}
        for name, shape in expect.items():
            if getattr(self, name).dtype != dtypes[name]:
                raise InvalidInputError(
                    f"profile {name} has dtype {getattr(self, name).dtype}, expected {dtypes[name]}"
                )
            if getattr(self, name).shape != shape:
                raise InvalidInputError(
                    f"profile {name} has shape {getattr(self, name).shape}, expected {shape}"
                )
        if self.inv_freq.dtype != np.float32:
            raise InvalidInputError(f"profile inv_freq has dtype {self.inv_freq.dtype}, expected float32")
        if not MIN_ROPE_SCALING <= self.rope_scaling <= MAX_ROPE_SCALING:  # also refuses NaN
            raise InvalidInputError(f"profile rope scaling {self.rope_scaling} is out of range")
        if self.has_rope and (self.inv_freq.ndim != 1 or 2 * self.inv_freq.size > self.head_dim):
            raise InvalidInputError("profile rotary frequencies do not fit the head dimension")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.inv_freq))):
            raise InvalidInputError("profile holds non-finite values")
        if not np.all((self.layer_weight >= MIN_LAYER_WEIGHT) & (self.layer_weight <= MAX_LAYER_WEIGHT)):
            raise InvalidInputError(
                f"profile layer weights must lie in [{MIN_LAYER_WEIGHT:g}, {MAX_LAYER_WEIGHT:g}]"
            )
        if np.any(np.abs(self.mean) > MAX_ABS_MEAN):
            raise InvalidInputError("profile mean is out of range")
        if np.any(np.abs(self.basis.astype(np.int32)) >= 1 << BASIS_BITS):
            raise InvalidInputError("profile basis exceeds its integer range")
        if np.any((self.basis_exp < 0) | (self.basis_exp > 60)):
            raise InvalidInputError("profile basis exponent out of range")
        if not 0 <= self.sink_tokens <= 1024:
            raise InvalidInputError("profile sink token count out of range")


def profile_digest(profile: CalibrationProfile) -> str:
    """SHA-256 over a canonical form of the profile (sorted config JSON, then each tensor's name, dtype,
    shape and bytes), so that the digest does not depend on how a serialiser orders its header."""
    config = json.dumps(
        {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model_fingerprint": profile.model_fingerprint,
            "layers": profile.layers,
            "kv_heads": profile.kv_heads,
            "head_dim": profile.head_dim,
            "heads_per_group": profile.heads_per_group,
            "rope_scaling": profile.rope_scaling,
            "sink_tokens": profile.sink_tokens,
            "notes": profile.notes,
        },
        sort_keys=True,
    )
    h = hashlib.sha256(config.encode())
    for name in ("basis", "basis_exp", "inv_freq", "layer_weight", "mean"):
        arr = np.ascontiguousarray(getattr(profile, name))
        h.update(f"|{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def with_digest(profile: CalibrationProfile) -> CalibrationProfile:
    """Return the profile with its digest filled in (see ``profile_digest``)."""
    return dataclasses.replace(profile, digest=profile_digest(profile))


def check_profile_matches(profile: CalibrationProfile, digest_prefix: bytes) -> None:
    """Raise ProfileMismatchError unless ``digest_prefix`` (from a chunk header) names ``profile``."""
    if bytes.fromhex(profile.digest)[: len(digest_prefix)] != digest_prefix:
        raise ProfileMismatchError(
            f"chunk was encoded with calibration profile {digest_prefix.hex()}, "
            f"but profile {profile.digest[: 2 * len(digest_prefix)]} was supplied"
        )


def _integer_basis(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise float bases [..., d, d] to int16 with a per-matrix power-of-two scale."""
    peak = np.abs(basis).max(axis=(-1, -2))
    peak = np.where(peak > 0, peak, 1.0)
    exp = np.floor(np.log2(((1 << BASIS_BITS) - 1) / peak)).astype(np.int64)
    exp = np.clip(exp, 0, 60)
    ints = np.rint(np.ldexp(basis, exp[..., None, None]))
    return ints.astype(np.int16), exp.astype(np.int8)


def fit_profile(
    samples: list[np.ndarray],
    *,
    model_fingerprint: str,
    inv_freq: np.ndarray | None,
    rope_scaling: float = 1.0,
    key_weight: np.ndarray | None = None,
    value_metric: np.ndarray | None = None,
    layer_weight: np.ndarray | None = None,
    heads_per_group: int | None = None,
    sink_tokens: int = 4,
    notes: str = "",
) -> CalibrationProfile:
    """Fit a profile from RoPE-free calibration KV.

    samples: float arrays [L, 2, H, T, D] whose keys already have RoPE removed (``transform.unrope``)
    and whose first ``sink_tokens`` positions are excluded. key_weight [L, H, D] and value_metric
    [L, H, D, D] (symmetric positive definite) weight the distortion of keys and values by how the model
    uses them (query energy per channel, output-projection metric); PCA runs in that weighted space, so
    uniform quantisation of the components spends bits where the model is sensitive.
    """
    if not samples:
        raise InvalidInputError("calibration needs at least one KV sample")
    L, two, H, _, D = samples[0].shape
    if two != 2 or any(s.shape[:3] != (L, 2, H) or s.shape[4] != D for s in samples):
        raise InvalidInputError("calibration samples must share the layout [L, 2, H, T, D]")
    hpg = heads_per_group or (H if H * D <= 512 else 1)
    if H % hpg:
        raise InvalidInputError(f"heads_per_group {hpg} does not divide {H} kv heads")
    G, d = H // hpg, hpg * D
    x = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples], axis=3)  # [L, 2, H, T, D]
    if not np.all(np.isfinite(x)):
        raise InvalidInputError("calibration KV holds NaN or Inf")
    # Metric factors W (per layer/K-V/head, D x D) so that distortion ~ |W^T (x - x_hat)|^2.
    metric = np.zeros((L, 2, H, D, D))
    metric[:, 0] = np.eye(D) if key_weight is None else np.sqrt(key_weight)[..., None] * np.eye(D)
    if value_metric is None:
        metric[:, 1] = np.eye(D)
    else:
        metric[:, 1] = np.linalg.cholesky(value_metric)  # M = W W^T
    mean = np.zeros((L, 2, G, d))
    basis = np.zeros((L, 2, G, d, d))
    for layer in range(L):
        for kv in range(2):
            for g in range(G):
                heads = range(g * hpg, (g + 1) * hpg)
                xg = np.concatenate([x[layer, kv, h] for h in heads], axis=-1)  # [T, d]
                w = np.zeros((d, d))
                for i, h in enumerate(heads):
                    w[i * D : (i + 1) * D, i * D : (i + 1) * D] = metric[layer, kv, h]
                mu = xg.mean(0)
                y = (xg - mu) @ w
                cov = y.T @ y / max(1, y.shape[0] - 1)
                eigval, eigvec = np.linalg.eigh(cov)
                order = np.argsort(eigval)[::-1]
                v = eigvec[:, order]
                # forward: coeff = (x - mu) @ w @ v ; inverse: x = coeff @ (v^T w^-1) + mu
                mean[layer, kv, g] = mu
                basis[layer, kv, g] = v.T @ np.linalg.inv(w)
    basis_int, basis_exp = _integer_basis(basis)
    weights = np.ones((L, 2)) if layer_weight is None else np.asarray(layer_weight, dtype=np.float64)
    profile = CalibrationProfile(
        model_fingerprint=model_fingerprint,
        layers=L,
        kv_heads=H,
        head_dim=D,
        heads_per_group=hpg,
        mean=mean.astype(np.float32),
        basis=basis_int,
        basis_exp=basis_exp,
        layer_weight=weights.astype(np.float32),
        inv_freq=np.zeros(0, np.float32) if inv_freq is None else np.asarray(inv_freq, np.float32),
        rope_scaling=rope_scaling,
        sink_tokens=sink_tokens,
        notes=notes,
    )
    profile.validate()
    return with_digest(profile)
