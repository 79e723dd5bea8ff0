"""Model calibration: build the per-model ``CalibrationProfile`` the codec needs, and cache it on disk.

Calibration runs the model once over fixed license texts and measures three things:

* the KV statistics (mean, PCA basis) of RoPE-free keys and of values, per (layer, K/V, head group);
* how the model *uses* each cached channel: the query energy each key channel sees (``key_weight``) and
  the output-projection metric of each value head (``value_metric``), so that PCA runs in a
  distortion-weighted space;
* per-(layer, K/V) sensitivity: the next-token KL divergence caused by white noise in the profile's
  coefficient space, turned into step multipliers (``layer_weight``).

Measured on SmolLM2-135M, the weighted space plus sensitivity-scaled steps need ~35% fewer bits than
plain PCA for the same KL divergence.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvwire.errors import InvalidInputError, NotFoundError
from kvwire.kernels.profile import CalibrationProfile, fit_profile, with_digest
from kvwire.kernels.transform import apply_rope, remove_rope, rope_tables
from kvwire.model import (
    LICENSES_DIR,
    cache_kwargs,
    model_fingerprint,
    prefill_kv,
    rope_parameters,
    tensor_to_cache,
)

# Texts from /usr/share/common-licenses. GPL-3, Apache-2.0 and GFDL-1.3 are the benchmark texts and must
# never be calibrated on; LGPL-2 is left out because its opening is nearly identical to LGPL-2.1's.
CALIBRATION_TEXTS = ("LGPL-2.1", "MPL-2.0", "MPL-1.1", "Artistic", "BSD")
BENCHMARK_TEXTS = ("GPL-3", "Apache-2.0", "GFDL-1.3")

# Probe noise, in coefficient units. On SmolLM2 it gives probe KLs of 5e-7..4e-3 (values: exactly
# quadratic in sigma; keys: mildly super-quadratic, alpha_K grows ~1.3x from sigma 0.25 to 0.5 and ~5x
# to 2.0, because key noise acts through the softmax). 0.5 is close to the key noise of base step 1.
NOISE_SIGMA = 0.5
MAX_PROBE_KL = 0.02  # above this the response is no longer quadratic: the probe is retried smaller
# Step multipliers are scaled so that base step 1.0 predicts this total KL (sum over layers and K/V).
TARGET_KL_AT_UNIT_STEP = 0.01

PROFILE_SUFFIX = ".kvprofile"
_FINGERPRINT = re.compile(r"[0-9a-f]{16,128}")

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------- tokens


def calibration_tokens(tokenizer: Any, n_tokens: int, names: Sequence[str] = CALIBRATION_TEXTS) -> list[int]:
    """``n_tokens`` tokens drawn from the start of each text in ``names``, shared as evenly as they allow.

    Short texts give all they have and the rest is spread over the longer ones; the pieces are
    concatenated in the order of ``names``, so the first piece is one contiguous run of prose.
    """
    if n_tokens <= 0:
        raise InvalidInputError(f"n_tokens must be positive, got {n_tokens}")
    if leaked := sorted(set(names) & set(BENCHMARK_TEXTS)):
        raise InvalidInputError(f"benchmark texts must not be used for calibration: {leaked}")
    pieces: dict[str, list[int]] = {}
    for name in names:
        path = LICENSES_DIR / name
        if os.sep in name or not path.is_file():
            raise NotFoundError(f"no license text {name!r} in {LICENSES_DIR}")
        text = path.read_text(encoding="utf-8")
        pieces[name] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    total = sum(len(ids) for ids in pieces.values())
    if total < n_tokens:
        raise InvalidInputError(f"texts {list(names)} give {total} tokens, {n_tokens} requested")
    share: dict[str, int] = {}
    remaining = n_tokens
    for i, name in enumerate(sorted(names, key=lambda n: len(pieces[n]))):
        share[name] = min(len(pieces[name]), remaining // (len(names) - i))
        remaining -= share[name]
    share[max(names, key=lambda n: len(pieces[n]) - share[n])] += remaining  # rounding leftovers
    return [token for name in names for token in pieces[name][: share[name]]]


# ----------------------------------------------------------------------------------- model anatomy


def _decoder_layers(model: Any) -> Sequence[Any] | None:
    """The decoder's layer list of a Llama-style model (``model.model.layers`` or the decoder's)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        try:
            layers = getattr(model.get_decoder(), "layers", None)
        except (AttributeError, NotImplementedError):
            layers = None
    return layers


def _attention_projections(model: Any) -> list[tuple[Any, Any]] | None:
    """Per-layer ``(q_proj, o_proj)`` when the model has separate Llama-style projections, else None."""
    decoder_layers = _decoder_layers(model)
    if not decoder_layers:
        return None
    pairs = []
    for layer in decoder_layers:
        attn = getattr(layer, "self_attn", None)
        q_proj, o_proj = getattr(attn, "q_proj", None), getattr(attn, "o_proj", None)
        if not (isinstance(q_proj, torch.nn.Linear) and isinstance(o_proj, torch.nn.Linear)):
            return None
        pairs.append((q_proj, o_proj))
    return pairs


def _query_heads(model: Any) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return int(config.num_attention_heads)


def _usable_projections(
    projections: list[tuple[Any, Any]] | None, layers: int, query_heads: int, kv_heads: int, head_dim: int
) -> bool:
    """Whether the projections match the cache layout (one pair per layer, GQA-divisible widths)."""
    if projections is None or len(projections) != layers or query_heads % kv_heads:
        return False
    width = query_heads * head_dim
    return all(q.out_features == width and o.in_features == width for q, o in projections)


@dataclass(frozen=True)
class _Rope:
    """RoPE of the model as the codec applies it: kernels.transform tables for positions 0..T-1."""

    inv_freq: np.ndarray  # float32 [rotary_dim // 2]
    scaling: float

    def tables(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        return rope_tables(np.arange(tokens), self.inv_freq, self.scaling)


def _model_rope(model: Any, head_dim: int) -> _Rope | None:
    """The model's rotary embedding, or None when it has none the codec can take off (GPT-2 style)."""
    try:
        params = rope_parameters(model)
    except InvalidInputError:
        return None
    inv_freq = params.inv_freq.detach().cpu().float().numpy()
    if params.head_dim != head_dim or 2 * inv_freq.size > head_dim:
        return None
    return _Rope(inv_freq=inv_freq.astype(np.float32), scaling=params.attention_scaling)


# ----------------------------------------------------------------------------------- usage metrics


class _QueryEnergy:
    """Forward hooks on every ``q_proj`` that accumulate per-channel pre-RoPE query energy.

    Positions before ``skip`` (attention sinks) are left out, matching the KV sample.
    """

    def __init__(self, q_projs: Sequence[Any], skip: int) -> None:
        self.sums = [np.zeros(q.out_features) for q in q_projs]
        self.counts = np.zeros(len(q_projs), dtype=np.int64)
        self.seen = np.zeros(len(q_projs), dtype=np.int64)
        self.skip = skip
        self.handles = [q.register_forward_hook(self._hook(i)) for i, q in enumerate(q_projs)]

    def _hook(self, layer: int) -> Callable[..., None]:
        def record(module: Any, args: Any, output: torch.Tensor) -> None:
            q = output.detach().reshape(-1, output.shape[-1]).double()  # [T, n_q_heads * D] (batch 1)
            start = max(0, self.skip - int(self.seen[layer]))
            self.seen[layer] += q.shape[0]
            self.sums[layer] += (q[start:] ** 2).sum(0).cpu().numpy()
            self.counts[layer] += max(0, q.shape[0] - start)

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def key_weight(self, kv_heads: int, head_dim: int, rotary_dim: int) -> np.ndarray:
        """Query energy seen by each key channel, ``[L, kv_heads, D]``, averaged within RoPE pairs."""
        energy = np.stack(self.sums) / np.maximum(self.counts, 1)[:, None]  # [L, n_q * D]
        L = energy.shape[0]
        # GQA: query head j reads kv head j // (n_q / kv_heads); average over the heads of a group.
        weight = energy.reshape(L, kv_heads, -1, head_dim).mean(2)
        half = rotary_dim // 2
        if half:  # RoPE rotates channel i with i + rotary_dim/2, so they must share one weight
            pair = 0.5 * (weight[..., :half] + weight[..., half:rotary_dim])
            weight[..., :half] = pair
            weight[..., half:rotary_dim] = pair
        # A channel no query ever reads would make the metric singular; keep it tiny but positive.
        return weight + 1e-6 * weight.mean(-1, keepdims=True) + 1e-30


def _value_metric(o_projs: Sequence[Any], kv_heads: int, head_dim: int) -> np.ndarray:
    """Sum over the query heads sharing each kv head of ``W_o_g^T W_o_g``, ``[L, kv_heads, D, D]``."""
    D = head_dim
    metrics = []
    for o_proj in o_projs:
        w = o_proj.weight.detach().cpu().double().numpy()  # [hidden, n_q * D]
        blocks = w.reshape(w.shape[0], -1, D).transpose(1, 0, 2)  # [n_q, hidden, D]
        per_q = np.einsum("ghi,ghj->gij", blocks, blocks)  # [n_q, D, D]
        m = per_q.reshape(kv_heads, -1, D, D).sum(1)
        ridge = 1e-6 * np.trace(m, axis1=-2, axis2=-1)[:, None, None] / D + 1e-30
        metrics.append(m + ridge * np.eye(D))  # ridge: Cholesky must never fail
    return np.stack(metrics)


# -------------------------------------------------------------------------------------- sensitivity


@torch.no_grad()
def _continuation_logprobs(model: Any, kv: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Float64 log-probabilities ``[T, vocab]`` of the continuation tokens after cached context ``kv``."""
    out = model(continuation, use_cache=True, **cache_kwargs(model, tensor_to_cache(kv, model.config)))
    return torch.log_softmax(out.logits[0].double(), dim=-1)


def _sensitivities(
    model: Any,
    kv: torch.Tensor,
    continuation: list[int],
    base: CalibrationProfile,
    rope: _Rope | None,
    *,
    sigma: float,
    seed: int,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """KL per unit noise variance for each (layer, K/V), ``alpha [L, 2]``, and the probe KLs ``[L, 2]``.

    kv: the clean context cache ``[L, 2, H, C, D]`` (keys post-RoPE, as the model holds it). Noise is
    white in ``base``'s coefficient space, like quantisation noise: ``delta = sigma * eps @ basis``,
    added to RoPE-free keys (so rotated before adding to cached keys) or to values, on every position
    after the sink tokens.
    """
    L, _, H, C, D = kv.shape
    hpg, d = base.heads_per_group, base.group_dim
    sink = min(base.sink_tokens, C - 1)
    basis = base.basis_float()  # [L, 2, G, d, d]
    device = kv.device
    ids = torch.as_tensor(continuation, dtype=torch.long, device=device).reshape(1, -1)
    clean = _continuation_logprobs(model, kv, ids)
    p_clean = clean.exp()
    cos, sin = rope.tables(C) if rope is not None else (None, None)
    rng = np.random.default_rng(seed)
    alpha = np.zeros((L, 2))
    probe_kl = np.zeros((L, 2))
    for layer in range(L):
        for kv_index in range(2):
            eps = rng.standard_normal((base.groups, C - sink, d))
            s = sigma
            for _ in range(4):  # shrink the probe until the response is quadratic
                delta = s * np.einsum("gtc,gcd->gtd", eps, basis[layer, kv_index])  # [G, T, d]
                delta = delta.reshape(-1, C - sink, hpg, D).transpose(0, 2, 1, 3).reshape(H, C - sink, D)
                if kv_index == 0 and cos is not None and sin is not None:
                    delta = apply_rope(delta, cos[sink:], sin[sink:])
                noisy = kv.clone()
                noisy[layer, kv_index, :, sink:] += torch.from_numpy(np.asarray(delta, np.float32)).to(device)
                logp = _continuation_logprobs(model, noisy, ids)
                kl = float((p_clean * (clean - logp)).sum(-1).mean())
                if kl <= MAX_PROBE_KL:
                    break
                s /= 4
            alpha[layer, kv_index] = kl / (s * s)
            probe_kl[layer, kv_index] = kl
        if progress is not None:
            progress(f"sensitivity: layer {layer + 1}/{L}")
    return alpha, probe_kl


def step_multipliers(alpha: np.ndarray) -> np.ndarray:
    """``layer_weight [L, 2]`` from sensitivities: ``c * alpha**-0.5``, with ``c`` chosen so that uniform
    quantisation at base step 1.0 predicts a total KL of ``TARGET_KL_AT_UNIT_STEP``.

    Predicted KL(step s) = sum alpha * (s * w)**2 / 12 (uniform noise variance step**2 / 12).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.size == 0 or not np.all(np.isfinite(alpha)):
        raise InvalidInputError("sensitivities must be finite")
    positive = alpha[alpha > 0]
    # A (layer, K/V) whose noise moved nothing measurable gets the weight of a 1000x less sensitive one.
    floor = 1e-3 * float(np.median(positive)) if positive.size else 1.0
    alpha = np.maximum(alpha, floor)
    c = np.sqrt(TARGET_KL_AT_UNIT_STEP * 12.0 / alpha.size)
    return c / np.sqrt(alpha)


# -------------------------------------------------------------------------------------- calibration


def calibrate(
    model: Any,
    tokenizer: Any,
    *,
    token_ids: list[int] | None = None,
    n_tokens: int = 2048,
    sens_context: int = 512,
    sens_continuation: int = 64,
    heads_per_group: int | None = None,
    sink_tokens: int = 4,
    sigma: float = NOISE_SIGMA,
    seed: int = 0,
    progress: Progress | None = None,
) -> CalibrationProfile:
    """Calibrate ``model`` and return its profile; deterministic for a fixed ``seed``.

    The model is prefilled over ``n_tokens`` tokens of ``CALIBRATION_TEXTS`` (or over ``token_ids``
    when given, which bypasses the tokenizer's texts). Sensitivity uses the first ``sens_context``
    tokens as context and the next ``sens_continuation`` as the scored continuation.
    Models without separate q/o projections or without RoPE (GPT-2 style) get an identity metric and
    a profile without rotary frequencies.
    """
    say = progress or (lambda message: None)
    if token_ids is None:
        tokens = calibration_tokens(tokenizer, n_tokens)
        source = f"{len(tokens)} tokens of {', '.join(CALIBRATION_TEXTS)}"
    else:
        tokens = [int(t) for t in token_ids]
        source = f"{len(tokens)} caller-supplied tokens"
    if sens_context <= sink_tokens or sens_continuation <= 0:
        raise InvalidInputError("sensitivity needs a context longer than the sink tokens and a continuation")
    if len(tokens) < max(sens_context + sens_continuation, sink_tokens + 2):
        raise InvalidInputError(
            f"calibration needs at least {sens_context + sens_continuation} tokens, got {len(tokens)}"
        )

    say(f"prefill: {len(tokens)} tokens")
    projections = _attention_projections(model)
    energy = _QueryEnergy([q for q, _ in projections], skip=sink_tokens) if projections else None
    try:
        kv = prefill_kv(model, tokens)  # [L, 2, H, T, D], keys post-RoPE
    finally:
        if energy is not None:
            energy.remove()
    L, _, H, _, D = kv.shape
    rope = _model_rope(model, D)
    n_q = _query_heads(model)
    if not _usable_projections(projections, L, n_q, H, D):
        projections = energy = None

    sample = kv.detach().cpu().double().numpy()
    if rope is not None:
        cos, sin = rope.tables(sample.shape[3])
        sample[:, 0] = remove_rope(sample[:, 0], cos, sin, rope.scaling)
    sample = sample[..., sink_tokens:, :]
    key_weight = value_metric = None
    if energy is not None and projections is not None:
        rotary_dim = 2 * rope.inv_freq.size if rope is not None else 0
        key_weight = energy.key_weight(H, D, rotary_dim)
        value_metric = _value_metric([o for _, o in projections], H, D)

    fit: dict[str, Any] = {
        "model_fingerprint": model_fingerprint(model, tokenizer),
        "inv_freq": rope.inv_freq if rope is not None else None,
        "rope_scaling": rope.scaling if rope is not None else 1.0,
        "key_weight": key_weight,
        "value_metric": value_metric,
        "heads_per_group": heads_per_group,
        "sink_tokens": sink_tokens,
    }
    say("fit: unit-weight basis")
    base = fit_profile([sample], **fit)
    say(f"sensitivity: {sens_context} context + {sens_continuation} continuation tokens, {2 * L} probes")
    alpha, probe_kl = _sensitivities(
        model,
        kv[:, :, :, :sens_context],
        tokens[sens_context : sens_context + sens_continuation],
        base,
        rope,
        sigma=sigma,
        seed=seed,
        progress=progress,
    )
    notes = (
        f"kvwire calibration: {source}, first {sink_tokens} dropped; "
        f"metric: {'query energy + o_proj' if key_weight is not None else 'identity'}; "
        f"rope: {'removed' if rope is not None else 'none'}; "
        f"sensitivity: {sens_context}+{sens_continuation} tokens, sigma {sigma:g}, seed {seed}, "
        f"probe KL {probe_kl.min():.2e}..{probe_kl.max():.2e}; "
        f"layer_weight = c*alpha^-0.5, KL {TARGET_KL_AT_UNIT_STEP:g} at step 1"
    )
    # Same fit with the measured step multipliers: only layer_weight and notes change, so no refit.
    profile = replace(base, layer_weight=step_multipliers(alpha).astype(np.float32), notes=notes, digest="")
    profile.validate()
    return with_digest(profile)


# -------------------------------------------------------------------------------------- disk cache


def default_profile_dir() -> Path:
    """``$KVWIRE_DATA_DIR/profiles``, else ``$XDG_CACHE_HOME/kvwire/profiles`` (``~/.cache/kvwire``)."""
    data = os.environ.get("KVWIRE_DATA_DIR")
    if data:
        return Path(data) / "profiles"
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "kvwire" / "profiles"


def profile_cache_path(fingerprint: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the profile of the model with this fingerprint is cached: ``<dir>/<fingerprint>.kvprofile``."""
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidInputError(f"not a model fingerprint: {fingerprint!r}")
    directory = Path(cache_dir) if cache_dir is not None else default_profile_dir()
    return directory / f"{fingerprint}{PROFILE_SUFFIX}"


def _read_cached(path: Path, fingerprint: str) -> CalibrationProfile | None:
    """The cached profile at ``path`` if it parses, validates and belongs to ``fingerprint``."""
    try:
        profile = CalibrationProfile.from_bytes(path.read_bytes())
    except (OSError, InvalidInputError):
        return None
    return profile if profile.model_fingerprint == fingerprint else None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_calibrate(
    model: Any,
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
) -> CalibrationProfile:
    """The model's profile from the on-disk cache, or a fresh ``calibrate`` stored there atomically.

    A cached file that is corrupt, fails validation or names another model is recalibrated and replaced.
    """
    fingerprint = model_fingerprint(model, tokenizer)
    path = profile_cache_path(fingerprint, cache_dir)
    cached = _read_cached(path, fingerprint)
    if cached is not None:
        return cached
    profile = calibrate(model, tokenizer, progress=progress)
    _write_atomic(path, profile.to_bytes())
    return profile


__all__ = [
    "BENCHMARK_TEXTS",
    "CALIBRATION_TEXTS",
    "calibrate",
    "calibration_tokens",
    "default_profile_dir",
    "load_or_calibrate",
    "profile_cache_path",
    "step_multipliers",
]
