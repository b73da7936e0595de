"""fraqat_jax against Google's Qwix (AQT's successor for Flax NNX): step cost, schedule cost, numerics.

Needs the ``peers`` extra (``pip install 'fraqat_jax[peers]'``, i.e. ``qwix``). One run measures:

1. **Step cost.** A jitted training step (forward + backward + Adam, loss ``mean((y - t)**2)``) of
   the same NNX model in four forms, timed interleaved (fp32, fraqat, qwix, qwix, fp32, ...) so
   that other load hits all alike; medians, each as a ratio to the fp32 step. Models: an MLP
   1024 -> 4096 -> 1024 on 256 tokens, and a stack of 4 linear layers of width 512 on 256 tokens.
   W4A8 in both libraries, the closest settings each offers:

   ==============  ==============================================  ============================================
   form            weights                                         activations (layer inputs)
   ==============  ==============================================  ============================================
   fraqat          int4 per output channel, absmax / 7, codes      int8 per token, min/max (asymmetric),
                   [-7, 7]; bits are traced state                  scale (max - min) / 255
   qwix_absmax     int4 per output channel, absmax / 7.5, codes    int8 per token, absmax / 127.5 (symmetric)
                   [-8, 7]; bits are static (the qtype)
   qwix_minmax     same                                            int8 per token, min/max (asymmetric)
   ==============  ==============================================  ============================================

   ``"qwix"`` in the JSON is ``qwix_minmax``, Qwix's closest setting to ours. Differences that
   remain: fraqat fake-quantizes (float matmul on quantized values); Qwix runs
   real integer matmuls (int8 x int4 -> int32) when both sides are quantized, which is slow on a
   CPU and fast on GPU/TPU. Qwix's backward uses the unquantized weights for the input gradient
   (``g @ W.T``), fraqat the quantized ones (``g @ W_q.T``, the straight-through estimator of the
   quantized forward).

2. **Schedule cost.** Every bit-width of a schedule gets one training step. fraqat: the paper's
   9 stages 8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4 with one jitted step (bits are data). Qwix: the
   integer stages 8, 7, 6, 5, 4, each a new provider, a re-quantized model and a new compile;
   it cannot express 5.5 or 4.75 bits (the error it gives is reported). Both use a fresh
   ``jax.jit`` with the graph definition as a static argument; compiles are JAX's backend-compile
   events for that step (``CompileCounter``), with their seconds.

3. **Numerics at integer bits** (per output channel, on a seeded normal weight): code ranges,
   scale divisors, the largest difference between the two fake-quantized weights, and the same
   after rescaling: fraqat at ``b* = 1 + log2(2**(n-1) + 0.5)`` bits has Qwix's divisor
   ``2**(n-1) - 0.5`` and clip range ``[-2**(n-1), 2**(n-1) - 1]``, so the two then agree, up to
   elements within float32 rounding of a rounding boundary (one step apart; the count is reported).

    python benchmarks/peers.py [--iters 20] [--json PATH]
    python benchmarks/peers.py --smoke --json out.json     # tiny sizes, seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fraqat_jax import Rule, quantize, quantize_model, set_bits
from fraqat_jax.quant import quantize_codes

FRAQAT_STAGES = (8.0, 7.0, 6.0, 5.5, 5.0, 4.75, 4.5, 4.25, 4.0)
QWIX_STAGES = (8, 7, 6, 5, 4)
FORMS = ("fp32", "fraqat", "qwix_absmax", "qwix_minmax")


class Stack(nnx.Module):
    """Linear layers with GELU between them: widths ``(w0, w1, ..., wn)`` give n layers."""

    def __init__(self, widths, *, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(jax.nn.gelu(x))
        return x


def model_specs(smoke: bool) -> dict[str, tuple[tuple[int, ...], int]]:
    """Model name -> (layer widths, tokens)."""
    if smoke:
        return {"mlp": ((32, 128, 32), 16), "stack4x512": ((32,) * 5, 16)}
    return {"mlp": ((1024, 4096, 1024), 256), "stack4x512": ((512,) * 5, 256)}


def qwix_provider(weight_qtype, act_method: str):
    import qwix

    rule = qwix.QtRule(module_path=".*", weight_qtype=weight_qtype, act_qtype="int8",
                       act_calibration_method=act_method)
    return qwix.QtProvider([rule])


def make_form(form: str, widths, x, *, weight_qtype="int4"):
    """The model in one of ``FORMS`` (same random weights for every form)."""
    model = Stack(widths, rngs=nnx.Rngs(0))
    if form == "fp32":
        return model
    if form == "fraqat":
        model = quantize_model(model, [Rule(r".*", weight_bits=4.0, act_bits=8.0, channel_axis=-1)])
        set_bits(model, 4.0)
        return model
    import qwix

    return qwix.quantize_model(model, qwix_provider(weight_qtype, form.split("_")[1]), x)


def _loss(graphdef, params, rest, x, target):
    y = nnx.merge(graphdef, params, rest)(x)
    return jnp.mean(jnp.square(y - target))


_TX = optax.adam(1e-4)


def _train_step(graphdef, params, opt_state, rest, x, target):
    loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, rest, x, target)
    updates, opt_state = _TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def new_step():
    """A fresh jitted step with caches of its own (a new function object, so nothing compiled for
    an earlier step is reused); the graph definition is a static argument."""

    def _step(graphdef, params, opt_state, rest, x, target):
        return _train_step(graphdef, params, opt_state, rest, x, target)

    return jax.jit(_step, static_argnums=0, donate_argnums=(1, 2))


class CompileCounter:
    """Counts XLA compilations of the jitted function named ``fun_name`` (and their seconds) from
    JAX's monitoring events, inside a ``with`` block."""

    def __init__(self, fun_name: str):
        self.fun_name, self.count, self.seconds = fun_name, 0, 0.0

    def _listener(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") in (
                self.fun_name, f"jit({self.fun_name})"):
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, params)  # donated by the step
    return graphdef, params, _TX.init(params), rest


def step_ratios(widths, tokens: int, iters: int) -> dict:
    """Median step time of each form, interleaved, and its ratio to fp32."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (tokens, widths[0]), jnp.float32)
    target = jax.random.normal(k2, (tokens, widths[-1]), jnp.float32)
    runs = {}
    for form in FORMS:
        step = new_step()
        graphdef, params, opt_state, rest = _split(make_form(form, widths, x))
        params, opt_state, loss = step(graphdef, params, opt_state, rest, x, target)  # compile
        jax.block_until_ready(loss)
        runs[form] = [step, graphdef, params, opt_state, rest, []]
    for _ in range(iters):
        for r in runs.values():
            step, graphdef, params, opt_state, rest, times = r
            t0 = time.perf_counter()
            params, opt_state, loss = step(graphdef, params, opt_state, rest, x, target)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
            r[2], r[3] = params, opt_state
    ms = {form: float(np.median(r[5])) * 1e3 for form, r in runs.items()}
    ms["qwix"] = ms["qwix_minmax"]  # Qwix's closest setting to ours (min/max activations)
    return {"ms": ms, "ratios": {form: t / ms["fp32"] for form, t in ms.items()}}


def schedule_cost(widths, tokens: int) -> dict:
    """One step at each stage of a schedule: compile count, wall time, Qwix's re-quantizing time."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (tokens, widths[0]), jnp.float32)
    target = jax.random.normal(k2, (tokens, widths[-1]), jnp.float32)

    step = new_step()
    t0 = time.perf_counter()
    with CompileCounter("_step") as counted:
        graphdef, params, opt_state, rest = _split(make_form("fraqat", widths, x))
        for bits in FRAQAT_STAGES:
            rest = set_bits(rest, bits)
            params, opt_state, loss = step(graphdef, params, opt_state, rest, x, target)
            jax.block_until_ready(loss)
    fraqat = {"stages": list(FRAQAT_STAGES), "compiles": counted.count, "compile_seconds": counted.seconds,
              "seconds": time.perf_counter() - t0}

    step = new_step()
    requant = 0.0
    t0 = time.perf_counter()
    params = opt_state = None
    with CompileCounter("_step") as counted:
        for bits in QWIX_STAGES:
            t1 = time.perf_counter()
            model = make_form("qwix_minmax", widths, x, weight_qtype=f"int{bits}")
            if params is not None:  # carry the trained weights on, as a schedule would
                nnx.update(model, params)
            graphdef, params, fresh_opt_state, rest = _split(model)
            opt_state = fresh_opt_state if opt_state is None else opt_state
            requant += time.perf_counter() - t1
            params, opt_state, loss = step(graphdef, params, opt_state, rest, x, target)
            jax.block_until_ready(loss)
    qwix = {"stages": list(QWIX_STAGES), "compiles": counted.count, "compile_seconds": counted.seconds,
            "seconds": time.perf_counter() - t0, "requantize_seconds": requant}
    try:
        qwix_provider("int5.5", "minmax")
        make_form("qwix_minmax", widths, x, weight_qtype="int5.5")
        qwix["fractional_bits"] = "accepted"
    except Exception as e:  # noqa: BLE001 - report whatever Qwix says about a fractional width
        qwix["fractional_bits"] = f"rejected: {type(e).__name__}: {e}"
    return {"fraqat": fraqat, "qwix": qwix}


def matching_bits(n: int) -> float:
    """The fraqat bit-width whose divisor and clip range equal Qwix's symmetric int``n``."""
    return 1.0 + math.log2(2.0 ** (n - 1) + 0.5)


def integer_numerics(w: np.ndarray, n: int) -> dict:
    """Both quantizers on weight ``w`` (in, out), per output channel, at ``n`` integer bits."""
    import qwix

    w = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=0, keepdims=True)
    codes, scale, _ = quantize_codes(w, n, channel_axis=-1)
    ours = quantize(w, n, channel_axis=-1)
    rescaled = quantize(w, matching_bits(n), channel_axis=-1)
    qtype = {4: jnp.int4, 8: jnp.int8}.get(n, f"int{n}")
    q = qwix.quantize(w, qtype, channelwise_axes=(1,))
    theirs = qwix.dequantize(q)
    qcodes = np.asarray(q.qvalue).astype(np.int32)
    return {
        "fraqat": {"code_min": int(codes.min()), "code_max": int(codes.max()),
                   "scale_divisor": float(jnp.median(absmax / scale))},
        "qwix": {"code_min": int(qcodes.min()), "code_max": int(qcodes.max()),
                 "scale_divisor": float(jnp.median(absmax / q.scale))},
        "max_abs_diff": float(jnp.max(jnp.abs(ours - theirs))),
        "matching_bits": matching_bits(n),
        "max_abs_diff_rescaled": float(jnp.max(jnp.abs(rescaled - theirs))),
        # Elements that still differ lie within float32 rounding of a rounding boundary: b* is not
        # exact in float32, so the two scales differ in their last bits and such an element can
        # land one code apart (one step at most).
        "elements_differing_rescaled": int(jnp.sum(jnp.abs(rescaled - theirs) > 1e-3 * q.scale)),
    }


def numerics(smoke: bool) -> dict:
    shape = (64, 16) if smoke else (1024, 256)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return {f"int{n}": integer_numerics(w, n) for n in (4, 8)}


def run(*, smoke: bool = False, iters: int | None = None) -> dict:
    iters = iters or (3 if smoke else 20)
    specs = model_specs(smoke)
    steps = {name: step_ratios(widths, tokens, iters) for name, (widths, tokens) in specs.items()}
    sched_model = "stack4x512"
    sched = schedule_cost(*specs[sched_model])
    import qwix

    return {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "versions": {"jax": jax.__version__, "qwix": getattr(qwix, "__version__", "?")},
        "smoke": smoke, "iters": iters,
        "models": {name: {"widths": list(w), "tokens": t} for name, (w, t) in specs.items()},
        "ratios": {name: s["ratios"] for name, s in steps.items()},
        "step_ms": {name: s["ms"] for name, s in steps.items()},
        "compiles": {"fraqat": sched["fraqat"]["compiles"], "qwix": sched["qwix"]["compiles"]},
        "schedule": {"model": sched_model, **sched},
        "numerics": numerics(smoke),
    }


def print_report(r: dict) -> None:
    print(f"device: {r['device']}  jax {r['versions']['jax']}  qwix {r['versions']['qwix']}  "
          f"median of {r['iters']}, interleaved; step = fwd+bwd+Adam, ratio to the fp32 step")
    print(f"| model | {' | '.join(FORMS)} |")
    print("|---" * (len(FORMS) + 1) + "|")
    for name, ratios in r["ratios"].items():
        m = r["models"][name]
        label = f"{name} ({'->'.join(map(str, m['widths']))}, {m['tokens']} tokens)"
        print(f"| {label} | " + " | ".join(f"{ratios[f]:.2f}" for f in FORMS) + " |")
    s = r["schedule"]
    f, q = s["fraqat"], s["qwix"]
    print(f"schedule on {s['model']}: fraqat {len(f['stages'])} stages, {f['compiles']} compile(s) "
          f"({f['compile_seconds']:.2f} s), {f['seconds']:.2f} s in all; qwix {len(q['stages'])} stages, "
          f"{s['qwix']['compiles']} compiles ({s['qwix']['compile_seconds']:.2f} s), {s['qwix']['seconds']:.2f} s "
          f"(of which re-quantizing {s['qwix']['requantize_seconds']:.2f} s); qwix at 5.5 bits: "
          f"{s['qwix']['fractional_bits']}")
    for n, v in r["numerics"].items():
        f, q = v["fraqat"], v["qwix"]
        print(f"{n}: fraqat codes [{f['code_min']}, {f['code_max']}] scale absmax/{f['scale_divisor']:.4g}; "
              f"qwix codes [{q['code_min']}, {q['code_max']}] scale absmax/{q['scale_divisor']:.4g}; "
              f"max |diff| {v['max_abs_diff']:.3g}, at fraqat bits {v['matching_bits']:.4f}: "
              f"{v['max_abs_diff_rescaled']:.3g} ({v['elements_differing_rescaled']} element(s) one step apart, "
              "at float32 rounding boundaries)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models (CPU check that the script works)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per form (default 20; 3 with --smoke)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    a = p.parse_args(argv)
    try:
        import qwix  # noqa: F401
    except ImportError:
        print("benchmarks/peers.py needs qwix: pip install 'fraqat_jax[peers]'", file=sys.stderr)
        return 2
    r = run(smoke=a.smoke, iters=a.iters)
    print_report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
