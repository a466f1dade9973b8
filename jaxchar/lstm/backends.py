"""The one place that decides which backend runs an LSTM layer or a sampling loop.

Backends: `scan` (the nn.scan cells, jaxchar/lstm/cells.py: the definition and reference),
`fused` (jaxchar/lstm/fused.py: the layer with a hand-written backward pass, lax.scan loops),
`native` (the fused layer's loops, or the whole stateful sampling loop, in C++ on CPUs:
jaxchar/lstm/native/), `pallas` (the fused layer's loops as one Pallas kernel each, on
NVIDIA GPUs and on TPUs, or the whole stateful sampling loop as one, on NVIDIA GPUs:
jaxchar/lstm/pallas/; interpreted on CPUs, for tests) and `cudnn` (jaxchar/lstm/cudnn.py,
NVIDIA GPUs).

`model.impl = "auto"` picks a backend only where it is correct under jit, vmap and grad,
deterministic for a seed, and measured faster on that kind of machine (docs/benchmarks.md):

- layer (training, evaluation), CPU with an AVX-512 kernel variant loaded: `native` (float32,
  hidden % 64 == 0), else `fused`: the kernels measured faster than the fused layer.
- layer, CPU without AVX-512: `fused`: no kernel variant is built for it (an AVX2 build
  measured slower than the JAX paths, docs/benchmarks.md "Backends").
- layer, GPU or TPU: `fused`: cuDNN measured slower than the fused layer at the shipped
  configs' shapes (docs/benchmarks.md "On an NVIDIA H200 GPU"); TPUs have not been measured.
- layer, GRU cells or masked (left-padded) steps: `scan`, whatever the impl.
- `pallas` is never picked by auto: no GPU or TPU run has measured it yet (docs/benchmarks.md,
  "The Pallas training kernels"); forced, it runs on NVIDIA GPUs (hidden % 16 == 0), on
  TPUs (hidden % 128 == 0) and, interpreted, on CPUs.
- sample (stateful loop), CPU with an AVX-512 variant: `native` up to 64 rows without
  top-k/top-p (measured faster than the scan); everywhere else `scan`. Forced, `pallas` runs
  the whole loop as one Pallas kernel (jaxchar/lstm/pallas/sampling.py) up to 128 rows
  without top-k/top-p on NVIDIA GPUs (TPUs have no sampling kernel: the scan); auto does
  not pick it until a GPU run has measured it.

A forced backend (`scan`, `fused`, `native`, `pallas`, `cudnn`) runs wherever it applies; where this
machine cannot run it at all (no GPU for cuDNN, no kernels for native) `select` raises
`BackendError` saying why for the layers, while sampling takes the lax.scan loop (so that
a stored run generates anywhere). Where a forced backend does not apply to a call (a GRU, a masked
window, top-k sampling with native) that call takes the reference, and the reason says so.
Under `jax.vmap` the kernels fold the mapped axis into their rows (one call); mapped weights
run the lax.scan loops instead (see native/layer.py), and sampling folds only while the rows fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxchar.config import ModelConfig
from jaxchar.lstm import cudnn, native, pallas

# kernel variants that benchmarks showed faster than the JAX paths on their kind of CPU
MEASURED_FASTER = ("avx512bf16", "avx512")


class BackendError(ValueError):
    """A forced `model.impl` that this machine cannot run."""


@dataclass(frozen=True)
class Choice:
    """A backend and why; and what the layer needs of it, decided here once."""

    backend: str  # scan | fused | native | pallas | cudnn
    reason: str

    @property
    def time_major(self) -> bool:
        """Whether the layer takes and gives [time, batch, ...] (the fused layer's loops and
        the kernels inside them), else [batch, time, ...]."""
        return self.backend in ("fused", "native", "pallas")

    @property
    def kernel(self) -> str | None:
        """The kernel that runs the fused layer's recurrences, or the whole sampling loop
        ("native", "pallas"), if any."""
        return self.backend if self.backend in ("native", "pallas") else None


def select(
    cfg: ModelConfig,
    purpose: str,
    *,
    platform: str,
    rows: int = 1,
    masked: bool = False,
    filtered: bool = False,
) -> Choice:
    """The backend for `purpose` ("layer": the model over sequences, training and
    evaluation; "sample": the stateful sampling loop; "step": one character at a time, the
    decoders' step) of a model `cfg` on `platform`
    ("cpu", "gpu", "tpu"), for `rows` rows, with masked (left-padded) steps, or with a
    top-k/top-p filter."""
    impossible = _impossible(cfg, platform)
    if purpose == "layer":
        if impossible and cfg.cell == "lstm" and not masked:
            raise BackendError(impossible)
        return _layer(cfg, platform, masked)
    if purpose == "step":  # one character at a time (the decoders): nothing to fuse
        return Choice("scan", "one character a step: the nn.scan cell")
    if purpose == "sample":  # a stored run generates anywhere: its forced layer backend
        if impossible:  # does not decide the sampling loop
            return Choice("scan", f"{impossible.split(';')[0]}: the lax.scan loop")
        return _sampler(cfg, platform, rows, filtered)
    raise ValueError(f"purpose must be 'layer', 'sample' or 'step', not {purpose!r}")


def _impossible(cfg: ModelConfig, platform: str) -> str | None:
    """Why this machine cannot run the forced `cfg.impl` at all, or None."""
    if cfg.impl == "native" and (platform != "cpu" or not native.loader.available()):
        where = f"this is a {platform}" if platform != "cpu" else native.loader.variant()[1]
        return f"model.impl = 'native' cannot run here: {where}; use auto"
    if cfg.impl == "pallas" and platform not in ("gpu", "tpu", "cpu"):
        return f"model.impl = 'pallas' has no {platform} variant (NVIDIA GPUs, TPUs); use auto"
    if cfg.impl == "cudnn" and (platform != "gpu" or not cudnn.available()):
        return f"model.impl = 'cudnn' needs an NVIDIA GPU (this is a {platform}); use auto"
    return None


def _layer(cfg: ModelConfig, platform: str, masked: bool) -> Choice:
    if cfg.cell != "lstm":
        return Choice("scan", "GRU cells run on the nn.scan reference")
    if masked:
        return Choice("scan", "masked (left-padded) steps run on the nn.scan reference")
    if cfg.impl in ("scan", "fused"):
        return Choice(cfg.impl, f"model.impl = '{cfg.impl}'")
    if cfg.impl == "pallas":
        kernels = pallas.tpu if platform == "tpu" else pallas
        fits, why = kernels.supports(cfg.hidden, cfg.product_dtype)
        if not fits:
            return Choice("fused", f"model.impl = 'pallas', but {why}: the fused layer")
        if platform == "cpu":
            return Choice("pallas", "model.impl = 'pallas', in Pallas's interpreter (slow)")
        return Choice("pallas", f"model.impl = 'pallas': the {platform.upper()} kernels")
    if cfg.impl == "cudnn":
        if cfg.gate_activation != "sigmoid":
            return Choice("fused", "cuDNN has only the sigmoid gate: the fused layer")
        return Choice("cudnn", "model.impl = 'cudnn'")
    fits, why = native.layer_supports(cfg.hidden, cfg.product_dtype)
    if cfg.impl == "native":
        if fits:
            return Choice("native", f"model.impl = 'native' ({native.loader.variant()[0]})")
        return Choice("fused", f"model.impl = 'native', but {why}: the fused layer")
    if platform != "cpu":
        if platform == "gpu":
            return Choice("fused", "auto on gpu: the fused layer (docs/benchmarks.md, GPU)")
        return Choice("fused", f"auto on {platform}: the fused layer")
    if not fits:
        return Choice("fused", f"auto: {why}")
    name = native.loader.variant()[0]
    if name not in MEASURED_FASTER:
        return Choice("fused", f"auto: the {name} kernels measured slower than the fused layer")
    return Choice("native", f"auto: C++ recurrences ({name}), measured faster on this CPU kind")


def _sampler(cfg: ModelConfig, platform: str, rows: int, filtered: bool) -> Choice:
    if cfg.impl == "pallas":
        return _pallas_sampler(cfg, platform, rows, filtered)
    if cfg.impl not in ("auto", "native"):
        return Choice("scan", f"model.impl = '{cfg.impl}': the lax.scan loop")
    if platform != "cpu":
        return Choice("scan", f"the lax.scan loop on {platform}")
    if filtered:
        return Choice("scan", "top-k/top-p: the lax.scan loop (the kernel draws from all ids)")
    fits, why = native.generate_supports(cfg, rows)
    if not fits:
        return Choice("scan", f"{why}: the lax.scan loop")
    name = native.loader.variant()[0]
    if cfg.impl == "auto" and name not in MEASURED_FASTER:
        return Choice("scan", f"auto: the {name} kernel measured slower than the scan")
    return Choice("native", f"{cfg.impl}: C++ generation loop ({name})")


def _pallas_sampler(cfg: ModelConfig, platform: str, rows: int, filtered: bool) -> Choice:
    if platform == "tpu":
        return Choice("scan", "model.impl = 'pallas': no sampling kernel for TPUs, the scan")
    if filtered:
        return Choice("scan", "top-k/top-p: the lax.scan loop (the kernel draws from all ids)")
    fits, why = pallas.sampling.supports(cfg, rows)
    if not fits:
        return Choice("scan", f"model.impl = 'pallas', but {why}: the lax.scan loop")
    if platform == "cpu":
        return Choice("pallas", "model.impl = 'pallas': the Pallas loop, interpreted (slow)")
    return Choice("pallas", "model.impl = 'pallas': the Pallas sampling loop")


def choices(cfg: ModelConfig, platform: str) -> dict[str, Choice]:
    """What `cfg` runs here: training and evaluation, sampling one row and 64 rows, and
    sampling with a top-k/top-p filter (a BackendError's reason where forced and impossible)."""
    cases = {
        "train": dict(purpose="layer"),
        "sample, 1 row": dict(purpose="sample", rows=1),
        "sample, 64 rows": dict(purpose="sample", rows=64),
        "sample, top-k/top-p": dict(purpose="sample", filtered=True),
    }
    out = {}
    for name, kwargs in cases.items():
        try:
            out[name] = select(cfg, platform=platform, **kwargs)
        except BackendError as err:
            out[name] = Choice("none", str(err))
    return out


def machine() -> dict[str, str]:
    """What this machine offers the backends: platform and devices, the CPU's vector
    instruction sets, the C++ kernels' state, cuDNN."""
    import jax

    flags, (name, why) = native.cpu_flags(), native.loader.variant()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")
    devices = jax.devices()
    from jaxchar.version import __version__

    return {
        "jaxchar": __version__,
        "platform": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "jax": jax.__version__,
        "cpu": platform_name(),
        "cpu instruction sets": " ".join(f for f in wanted if f in flags) or "unknown",
        "C++ kernels": f"{name or 'not used'} ({why})",
        "cuDNN": "available" if cudnn.available() else "no (not an NVIDIA GPU)",
    }


def platform_name() -> str:
    import platform

    return f"{platform.machine()}, {native.cpu_model() or 'model unknown'}"


def runnable(cfg: ModelConfig, platform: str) -> tuple[ModelConfig, str | None]:
    """`cfg` as it can run here: a run trained with a backend this machine lacks (cuDNN on a
    GPU, read on a laptop) is read with `auto` instead, and the note says so; else (cfg,
    None). Parameters do not depend on the backend, so the results are the same model's."""
    try:
        select(cfg, "layer", platform=platform)
        return cfg, None
    except BackendError as err:
        note = f"note: {err}; this run is read with model.impl = 'auto' here"
        return dataclasses.replace(cfg, impl="auto"), note
