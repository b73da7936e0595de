"""Which layers get quantized, and how: :class:`Rule`, :func:`quantize_model`, :func:`set_bits`.

A module's *path* is the attribute names (and list indices) from the root joined by ``"."``, e.g.
``transformer_blocks.0.attn.to_q``: the diffusers key prefix. A rule's ``pattern`` is a regular
expression that must match the *whole* path (``re.fullmatch``): ``r".*\\.attn\\..*"`` picks every
attention projection, ``r"proj_out"`` only the root's ``proj_out``.

Bit-widths over training. The trainer (``fraqat_jax.recipe.step``) drives every layer with one
schedule, and the layers whose rule gave their own (config key ``layer_schedules``) with theirs::

    bits = schedule(step)                   # float32, may be traced
    model = set_bits(model, bits)           # or state = set_bits(state, bits)
    model = apply_schedules(model, step)    # layers whose rule has its own schedule

:func:`set_bits` sets the layers that follow the global bit-width: every quantized layer except
those whose rule gave a schedule (a layer with its own schedule belongs to that schedule, so
``Rule("proj_out", weight_bits=schedules.constant(8))`` pins a layer at 8 bits whatever the
trainer does). :func:`apply_schedules` evaluates the per-layer schedules; the two calls commute.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.nn.graph import find_layers, path_string, quantized_layers, replace_child, walk_to
from fraqat_jax.nn.layers import ACT_GRANULARITIES, ACT_RANGES, QUANTIZED_TYPES, Bits, kind_of
from fraqat_jax.quant import MAX_ACT_BITS, MAX_BITS, MIN_BITS, check_bits, validate_bits

LAYER_TYPES = ("Linear", "Conv", "Einsum")


def _is_schedule(value) -> bool:
    return callable(value) and hasattr(value, "total_steps")


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the layers whose path matches ``pattern`` are quantized.

    Args:
      pattern: regular expression matched against the whole module path (``re.fullmatch``).
      weight_bits: weight bit-width, a real number in [2, 16] (the layer's initial bit-width, later
        set by :func:`set_bits`), a schedule (``step -> bits`` with ``total_steps``, see
        ``fraqat_jax.schedules``; the layer then follows it through :func:`apply_schedules`), or
        None to keep the weights in full precision.
      act_bits: input bit-width in [2, 8] (8 is the paper's A8), or None to leave the input
        unquantized (e.g. the paper's W4A16 last layer).
      symmetric, channel_axis, group_size: weight quantizer options of ``fraqat_jax.quantize``
        (``channel_axis=-1`` is per output channel for Linear and Conv kernels).
      act_ranges: how an input range is found: ``"dynamic"`` (min/max at run time, the default)
        or ``"static"`` (a range calibrated once, ``fraqat_jax.calibrate``).
      act_granularity: the granularity of dynamic ranges: ``"token"`` (per token; Linear only) or
        ``"tensor"``; None picks ``"token"`` for Linear layers and ``"tensor"`` for Conv and Einsum.
      layer_types: restricts the rule to these kinds among ``"Linear"``, ``"Conv"``, ``"Einsum"``
        (``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``); None admits all three.

    A rule with both ``weight_bits`` and ``act_bits`` None keeps its layers as they are (exact).
    Invalid values raise ``ValueError`` here, not when the model runs.
    """

    pattern: str
    weight_bits: Any = 4
    act_bits: float | None = 8
    _: dataclasses.KW_ONLY
    symmetric: bool = True
    channel_axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    act_granularity: str | None = None
    act_ranges: str = "dynamic"
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule pattern must be a string (a regular expression), got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        wb = self.weight_bits
        if _is_schedule(wb):
            last = max(int(wb.total_steps) - 1, 0)
            for step in (0, last):
                check_bits(float(wb(step)), name=f"weight_bits schedule at step {step} (rule {self.pattern!r})")
        elif wb is not None:
            validate_bits(wb, name=f"weight_bits of rule {self.pattern!r}")
        if self.act_bits is not None:
            validate_bits(self.act_bits, name=f"act_bits of rule {self.pattern!r}")
            if float(self.act_bits) > MAX_ACT_BITS:
                raise ValueError(
                    f"act_bits={self.act_bits!r} of rule {self.pattern!r} is not allowed: use a value in "
                    f"[{MIN_BITS:g}, {MAX_ACT_BITS:g}] (activations run as int8 codes) or None for an unquantized input"
                )
        if self.act_granularity == "static":
            raise ValueError("act_granularity='static' was renamed: use act_ranges='static' (act_granularity is "
                             f"token or tensor); rule {self.pattern!r}")
        if self.act_ranges not in ACT_RANGES:
            raise ValueError(f"act_ranges={self.act_ranges!r} is not allowed: use one of {ACT_RANGES}")
        if self.act_granularity is not None and self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(
                f"act_granularity={self.act_granularity!r} is not allowed: use one of {ACT_GRANULARITIES} or None"
            )
        if self.channel_axis is not None and not isinstance(self.channel_axis, int):
            object.__setattr__(self, "channel_axis", tuple(self.channel_axis))
        if self.layer_types is not None:
            types = (self.layer_types,) if isinstance(self.layer_types, str) else tuple(self.layer_types)
            bad = [t for t in types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"layer_types {bad} not allowed: use a subset of {LAYER_TYPES}")
            object.__setattr__(self, "layer_types", types)

    def matches(self, path: str, kind: str) -> bool:
        if self.layer_types is not None and kind not in self.layer_types:
            return False
        return re.fullmatch(self.pattern, path) is not None


#: The paper's setting: every linear layer at W(b)A8, per-tensor symmetric weights. The initial
#: weight bit-width is 8, the first stage of the FraQAT schedule, so a freshly quantized model
#: starts next to its teacher; the trainer then sets the bits by schedule. Conv layers (e.g. a
#: patch embedding) stay in full precision, as in the paper, which quantizes only linear layers.
DEFAULT_RULES = (Rule(r".*", weight_bits=8, act_bits=8, layer_types=("Linear",)),)


def quantize_model(model: nnx.Module, rules: Sequence[Rule] | Rule | None = None) -> nnx.Module:
    """Replaces the ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum`` layers matched by ``rules``.

    Args:
      model: any NNX module; layers may sit in attributes, nested modules, ``nnx.List``/``nnx.Dict``
        or plain Python lists and dicts. Only exact ``nnx.Linear``/``nnx.Conv``/``nnx.Einsum``
        instances are replaced (a subclass may have its own forward pass).
      rules: a sequence of :class:`Rule`; for each layer the first rule that matches wins, and a
        layer no rule matches stays as it is. None means :data:`DEFAULT_RULES`.

    Returns:
      The model, changed in place (a root that is itself a layer is returned quantized). The
      quantized layers share the original ``kernel``/``bias`` Params (same names, shapes, metadata).

    Warns ``UserWarning`` for each rule that matched no layer.
    """
    if rules is None:
        rules = DEFAULT_RULES
    elif isinstance(rules, Rule):
        rules = (rules,)
    rules = tuple(rules)
    for rule in rules:
        if not isinstance(rule, Rule):
            raise ValueError(f"rules must be fraqat_jax.Rule objects, got {rule!r}")
    used = [False] * len(rules)
    for path, layer in find_layers(model, tuple(QUANTIZED_TYPES), exact=True):
        name = path_string(path)
        kind = kind_of(layer)
        for i, rule in enumerate(rules):
            if rule.matches(name, kind):
                used[i] = True
                break
        else:
            continue
        if rule.weight_bits is None and rule.act_bits is None:
            continue
        schedule = rule.weight_bits if _is_schedule(rule.weight_bits) else None
        init_bits = None if rule.weight_bits is None else (
            float(schedule(0)) if schedule is not None else rule.weight_bits)
        try:
            new = QUANTIZED_TYPES[type(layer)](
                layer, weight_bits=init_bits, schedule=schedule, act_bits=rule.act_bits,
                symmetric=rule.symmetric, channel_axis=rule.channel_axis, group_size=rule.group_size,
                act_granularity=rule.act_granularity, act_ranges=rule.act_ranges)
        except ValueError as e:
            raise ValueError(f"rule {rule.pattern!r} cannot quantize layer {name!r}: {e}") from None
        if not path:
            model = new
            continue
        replace_child(walk_to(model, path), path[-1], new, name)
    for rule, hit in zip(rules, used):
        if not hit:
            warnings.warn(f"fraqat_jax rule {rule.pattern!r} matched no layer", UserWarning, stacklevel=2)
    return model


def _matches(pattern, path: str) -> bool:
    return pattern is None or re.fullmatch(pattern, path) is not None


def _update_bits(target, pattern, new_value, *, scheduled: bool):
    """Sets Bits variables (of layers matching ``pattern``) whose schedule presence equals
    ``scheduled``; ``new_value(bits_variable)`` gives the value. Module: in place; State: copy."""
    if isinstance(target, nnx.State):
        hits = 0

        def f(path, var):
            nonlocal hits
            if (isinstance(var, Bits) and _matches(pattern, path_string(path[:-1]))
                    and (var.get_metadata().get("schedule") is not None) == scheduled):
                hits += 1
                return var.copy(jnp.broadcast_to(new_value(var), jnp.shape(var[...])))  # stacked: one per block
            return var

        out = target.map(f)
        return out, hits
    if not isinstance(target, nnx.Module):
        raise ValueError(f"expected an nnx.Module or an nnx.State, got {type(target).__name__}")
    hits = 0
    for path, layer in quantized_layers(target):
        var = layer.weight_bits
        if var is None or not _matches(pattern, path):
            continue
        if (var.get_metadata().get("schedule") is not None) != scheduled:
            continue
        var[...] = new_value(var)
        hits += 1
    return target, hits


def set_bits(model_or_state, bits, *, pattern: str | None = None):
    """Sets the weight bit-width of the quantized layers that follow the global bit-width.

    Args:
      model_or_state: a quantized model (changed in place) or its ``nnx.State`` (a new State is
        returned, the input is left alone), e.g. inside a jitted step.
      bits: a real number in [2, 16] or a JAX scalar, possibly traced (then never recompiles).
        Concrete bad values raise ``ValueError``; a traced value is clipped to [2, 16].
      pattern: if given, only layers whose path fully matches it; ``ValueError`` if none does.

    Layers with full-precision weights, and layers whose rule gave its own schedule (see
    :func:`apply_schedules`), are left alone. Returns the model or the new State.
    """
    value = check_bits(bits)
    out, hits = _update_bits(model_or_state, pattern, lambda var: value.astype(var[...].dtype), scheduled=False)
    if pattern is not None and hits == 0:
        raise ValueError(f"set_bits(pattern={pattern!r}) matched no quantized layer with a global bit-width")
    return out


def apply_schedules(model_or_state, step):
    """Sets each layer that has its own schedule (a rule's ``weight_bits`` schedule) to
    ``schedule(step)``; ``step`` may be traced. Returns the model (in place) or a new State."""
    step = jnp.asarray(step)
    out, _ = _update_bits(
        model_or_state, None,
        lambda var: jnp.asarray(var.get_metadata()["schedule"](step), var[...].dtype), scheduled=True)
    return out


def prequantized(model):
    """``model`` with each quantized kernel replaced by its fake-quantized value and marked
    ``kernel_prequantized`` (the forward pass uses it as it is), changed in place and returned.

    For gradient accumulation: quantize the weights once per step, then run every micro-batch on the
    result. The gradient with respect to the quantized kernel is the gradient with respect to the
    kernel (the straight-through estimator is the identity), so the update is unchanged. Works inside
    ``jax.jit`` on a merged model; the mark is static, so split again after calling it.
    """
    for _, layer in quantized_layers(model):
        if layer.weight_bits is not None:
            layer.kernel[...] = layer.quantized_kernel()
        layer.kernel_prequantized = True
    return model


def bits_of(model) -> dict[str, float | None]:
    """``{path: weight bits}`` of every quantized layer (None for full-precision weights)."""
    return {path: None if layer.weight_bits is None else _bits_value(layer.weight_bits[...])
            for path, layer in quantized_layers(model)}


def _bits_value(bits):
    """A float; a layer stacked over blocks (``models.scan``) whose blocks differ gives a list."""
    values = [float(b) for b in jnp.ravel(bits)]
    return values[0] if len(set(values)) == 1 else values


# ----------------------------------------------------------------------------- rules from a run's config


def parse_weight_granularity(text: str) -> tuple[int | None, int | None]:
    """``weight_granularity`` -> ``(channel_axis, group_size)`` of ``fraqat_jax.quantize``:
    ``tensor`` -> (None, None), ``channel`` -> (-1, None), ``group:N`` -> (-1, N). ``ValueError``
    naming the value otherwise."""
    if text == "tensor":
        return None, None
    if text == "channel":
        return -1, None
    if text.startswith("group:"):
        size = text[len("group:"):]
        if size.isdigit() and int(size) >= 1:
            return -1, int(size)
    raise ValueError(f"weight_granularity={text!r} is not allowed: use tensor, channel or group:N (N a positive "
                     "integer, e.g. group:128)")


def parse_keep(text: str) -> list[tuple[str, float | None]]:
    """``keep`` (``REGEX[:BITS]`` entries separated by ``;``) -> ``[(regex, weight_bits or None)]``.
    ``ValueError`` naming the entry for a bad regular expression or bit-width."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        pattern, bits = entry, None
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                bits = float(tail)
                pattern = head
            except ValueError:
                pass  # a ':' inside the regular expression
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"keep entry {entry!r}: {pattern!r} is not a valid regular expression ({e})") from None
        if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"keep entry {entry!r}: bits {tail!r} is not allowed: use a bit-width in "
                             f"[{MIN_BITS:g}, {MAX_BITS:g}]")
        out.append((pattern, bits))
    return out


def parse_layer_schedules(text: str) -> list[tuple[str, str]]:
    """``layer_schedules`` (``REGEX=SCHEDULE`` entries separated by ``;``, ``SCHEDULE`` a name of
    ``fraqat_jax.schedules.by_name``) -> ``[(regex, schedule name)]``. ``ValueError`` naming a bad entry."""
    from fraqat_jax import schedules

    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        pattern, sep, name = entry.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"layer_schedules entry {entry!r} is not REGEX=SCHEDULE (e.g. 'proj_out=constant')")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"layer_schedules entry {entry!r}: {pattern!r} is not a valid regular expression "
                             f"({e})") from None
        try:
            schedules.parse_name(name.strip())
        except ValueError as e:
            raise ValueError(f"layer_schedules entry {entry!r}: {e}") from None
        out.append((pattern, name.strip()))
    return out


def config_rules(cfg, layer_types: Sequence[str] = ("Linear",)) -> list[Rule]:
    """A run's rules from its config, first match wins: each ``keep`` entry (input unquantized,
    weights following the schedule or pinned at its bits), each ``layer_schedules`` entry (weights
    following their own schedule through :func:`apply_schedules`), then the paper's rule: every layer of
    ``layer_types``, weights from 8 bits down (the schedule sets them each step), activations at
    ``act_bits`` (8: A8), ranges per ``act_ranges`` (dynamic or static) and ``act_granularity``,
    weight scales per ``weight_granularity``."""
    from fraqat_jax import schedules

    channel_axis, group_size = parse_weight_granularity(cfg.weight_granularity)
    weights = dict(channel_axis=channel_axis, group_size=group_size, layer_types=tuple(layer_types))
    acts = dict(act_bits=float(cfg.act_bits), act_ranges=cfg.act_ranges, act_granularity=cfg.act_granularity)
    rules = [Rule(pattern, weight_bits=8.0 if bits is None else schedules.constant(bits), act_bits=None, **weights)
             for pattern, bits in parse_keep(cfg.keep)]
    rules += [Rule(pattern, weight_bits=schedules.by_name(name, int(cfg.steps), target_bits=float(cfg.target_bits),
                                                          start_bits=float(cfg.start_bits)), **acts, **weights)
              for pattern, name in parse_layer_schedules(cfg.layer_schedules)]
    rules.append(Rule(r".*", weight_bits=8.0, **acts, **weights))
    return rules
