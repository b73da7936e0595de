"""The one text decoder: prompts in, continuations out, over the Gemma-2 port's key-value cache.

Every model of a text run decodes through here: the teacher, the fake-quantized student, the frozen
integer student and an exported one (any module with the port's ``init_cache`` / ``prefill`` /
``decode_step``, as ``models.gemma2.Gemma2ForCausalLM``), for the training-time samples, LLM-QAT's
data-free sequences, ``python -m fraqat_jax.generate`` and the lm-eval adapter.

The decoding itself (:func:`decode_loop`, :func:`generate_tokens`) is pure JAX, as tunix's
``Sampler`` and ``gemma``'s ``gm.text.Sampler`` are built: one prefill of the left-padded prompts
(positions from the mask, last-token logits only), then one ``jax.lax.while_loop`` over new tokens
that stops when every row has emitted an end token. Each step picks the argmax (greedy) unless
sampling is on; then the logits are divided by ``temperature``, cut to the ``top_k`` largest and to
the smallest set whose probability reaches ``top_p`` (the order of transformers' logits warpers),
and a token is drawn with ``fold_in(key, step)``. After an end token a row emits ``pad_id``.

:class:`Sampler` adds the host side: tokenization and detokenization (special tokens skipped), the
end tokens of a folder (:func:`end_token_ids`), stop strings (checked between chunks of steps; the
text is cut before the first one), chat templates (:func:`apply_chat_template`), batching in
fixed shapes (prompt lengths rounded up, so one compiled program serves many prompts) and the
bound of ``max_position_embeddings``. Its prefill and its decode loop are each one ``jax.jit``
program, the cache donated to both.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Completion", "Sampler", "SamplerError", "apply_chat_template", "chat_template", "decode_loop",
           "end_token_ids", "filter_logits", "generate_tokens", "pick_tokens"]

END_OF_TURN = "<end_of_turn>"


class SamplerError(ValueError):
    """Bad generation input (an empty prompt, a prompt longer than the cache, a bad option): the
    message names the value and what is allowed."""


def filter_logits(logits, temperature, top_k, top_p):
    """``logits [B, V]`` float32 divided by ``temperature``, then every token outside the ``top_k``
    largest (``top_k`` <= 0: no cut) and outside the smallest set whose probability reaches ``top_p``
    (``top_p`` >= 1: no cut) set to ``-inf``. The three may be traced."""
    logits = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    v = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1, keepdims=True)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    kept = ((before < top_p) | (top_p >= 1) | (jnp.arange(v) == 0)) & (ordered > -jnp.inf)
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def pick_tokens(logits, key, *, sample: bool, greedy, temperature=1.0, top_k=0, top_p=1.0):
    """``[B]`` int32 tokens: the argmax of ``logits [B, V]``; with ``sample``, a draw from the
    filtered logits (:func:`filter_logits`) wherever ``greedy`` (a traced bool) is false."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return best
    if isinstance(top_k, int) and top_k <= 0 and isinstance(top_p, (int, float)) and top_p >= 1:
        scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)  # no cut: no sort
    else:
        scaled = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(greedy, best, drawn)


def decode_loop(model, logits, cache, key, *, steps: int, sample: bool = False, temperature=1.0, top_k=0,
                top_p=1.0, eos_ids: Sequence[int] = (), pad_id: int = 0, done=None, offset=0, greedy_steps=0,
                limit=None, keep_logits: bool = False) -> dict:
    """Up to ``steps`` new tokens per row from the logits of the last prompt token (``logits [B, V]``,
    ``cache`` from ``model.prefill``), in one ``jax.lax.while_loop`` that ends early when every row
    is done (emitted one of ``eos_ids``, or ``done [B]`` on entry).

    Step ``i`` (counted from ``offset``, for a decode resumed in chunks) draws with ``fold_in(key,
    offset + i)`` and is greedy while ``offset + i < greedy_steps``; ``limit`` (traced or not) stops
    after that many steps. -> ``{"tokens" [B, steps] (``pad_id`` after the end), "done" [B],
    "logits" (of the next step), "cache", "steps" (taken)}``, plus ``"step_logits" [B, steps, V]``
    float32 with ``keep_logits``."""
    b, v = logits.shape
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    limit = steps if limit is None else jnp.minimum(jnp.asarray(limit, jnp.int32), steps)
    state = {"i": jnp.zeros((), jnp.int32), "logits": logits.astype(jnp.float32), "cache": cache,
             "tokens": jnp.full((b, steps), pad_id, jnp.int32),
             "done": jnp.zeros((b,), bool) if done is None else jnp.asarray(done, bool)}
    if keep_logits:
        state["step_logits"] = jnp.zeros((b, steps, v), jnp.float32)

    def cond(s):
        return (s["i"] < limit) & ~jnp.all(s["done"])

    def body(s):
        i = s["i"]
        t = i + offset
        token = pick_tokens(s["logits"], jax.random.fold_in(key, t), sample=sample, greedy=t < greedy_steps,
                            temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(s["done"], pad_id, token)
        out = dict(s, i=i + 1, tokens=s["tokens"].at[:, i].set(token),
                   done=s["done"] | jnp.any(token[:, None] == eos[None, :], axis=-1))
        if keep_logits:
            out["step_logits"] = s["step_logits"].at[:, i].set(s["logits"])
        next_logits, out["cache"] = model.decode_step(token, s["cache"])
        out["logits"] = next_logits.astype(jnp.float32)
        return out

    state = jax.lax.while_loop(cond, body, state)
    result = {"tokens": state["tokens"], "done": state["done"], "logits": state["logits"], "cache": state["cache"],
              "steps": state["i"]}
    if keep_logits:
        result["step_logits"] = state["step_logits"]
    return result


def generate_tokens(model, input_ids, attention_mask, key, *, max_new_tokens: int, **options) -> dict:
    """Prefill and decode in one function (for use inside a ``jit``, e.g. the training-time samples):
    ``input_ids``, ``attention_mask`` ``[B, P]`` left-padded -> :func:`decode_loop`'s dict (cache
    dropped). The cache holds ``P + max_new_tokens`` slots."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, p = input_ids.shape
    logits, cache = model.prefill(input_ids, attention_mask, model.init_cache(b, p + max_new_tokens))
    out = decode_loop(model, logits, cache, key, steps=max_new_tokens, **options)
    out.pop("cache")
    return out


# ----------------------------------------------------------------------------- folders: end tokens, chat template


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def end_token_ids(folder: str | None, config: dict | None = None, tokenizer=None) -> tuple[int, ...]:
    """The tokens that end a continuation: ``generation_config.json``'s ``eos_token_id`` (an id or a
    list) in ``folder``, else ``config``'s, plus ``<end_of_turn>`` when the tokenizer has it."""
    ids: list[int] = []
    path = os.path.join(folder, "generation_config.json") if folder else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            ids = _ids(json.load(f).get("eos_token_id"))
    if not ids:
        ids = _ids((config or {}).get("eos_token_id"))
    turn = tokenizer.token_to_id(END_OF_TURN) if tokenizer is not None else None
    if turn is not None:
        ids.append(int(turn))
    return tuple(dict.fromkeys(ids))


def chat_template(folder: str | None) -> str | None:
    """The chat template of a transformers folder: ``chat_template.jinja``, or the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or the one named ``default`` of a
    list); None when it has none."""
    if not folder:
        return None
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def apply_chat_template(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                        add_generation_prompt: bool = True) -> str:
    """``messages`` (``{"role", "content"}``) rendered by a Jinja chat template in a sandbox, with the
    names transformers gives one (``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``,
    ``raise_exception``)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise SamplerError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise SamplerError(f"the chat template cannot be rendered: {e}") from None


# ----------------------------------------------------------------------------- the host side


class Completion(str):
    """One continuation: the text itself (a ``str``: decoded with special tokens skipped, cut before
    a stop string), with ``prompt`` and ``tokens`` (its token ids, the end token excluded)."""

    prompt: str
    tokens: list[int]

    def __new__(cls, prompt: str, text: str, tokens: Sequence[int]):
        obj = super().__new__(cls, text)
        obj.prompt, obj.tokens = prompt, [int(t) for t in tokens]
        return obj

    @property
    def text(self) -> str:
        return str(self)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Sampler:
    """Batched generation from a text model (see the module docstring).

    Args:
      model: the port (or its quantized / frozen form).
      tokenizer: a ``tokenizers.Tokenizer`` (needed for text in and out, not for token ids).
      eos_ids: the end tokens (:func:`end_token_ids`); pad_id: the id of left padding.
      max_length: the cache bound on positions (default ``max_position_embeddings``).
      template: the chat template (:func:`chat_template`), for ``chat=True``.
      batch_size: rows per program; length_multiple: prompt lengths are rounded up to it.
    """

    def __init__(self, model, tokenizer=None, *, eos_ids: Sequence[int] = (), pad_id: int | None = None,
                 max_length: int | None = None, template: str | None = None, batch_size: int = 8,
                 length_multiple: int = 32):
        config = dict(getattr(model, "config", {}) or {})
        self.tokenizer, self.template = tokenizer, template
        self.eos_ids = tuple(int(i) for i in eos_ids) or tuple(_ids(config.get("eos_token_id")))
        pad = config.get("pad_token_id") if pad_id is None else pad_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids or (0,))[0])
        self.max_length = int(max_length or config.get("max_position_embeddings") or 2048)
        self.batch_size, self.length_multiple = int(batch_size), int(length_multiple)
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef

        def prefill(state, ids, mask, cache):
            return nnx.merge(graphdef, state).prefill(ids, mask, cache)

        def decode(state, logits, cache, key, done, offset, options, steps, sample, keep_logits):
            return decode_loop(nnx.merge(graphdef, state), logits, cache, key, steps=steps, sample=sample,
                               eos_ids=self.eos_ids, pad_id=self.pad_id, done=done, offset=offset,
                               keep_logits=keep_logits, **options)

        self._prefill = jax.jit(prefill, donate_argnums=(3,))
        self._decode = jax.jit(decode, donate_argnums=(2,), static_argnames=("steps", "sample", "keep_logits"))
        self._model = model
        bos = _ids(config.get("bos_token_id"))
        self.bos_id = bos[0] if bos else None

    # -- token ids ----------------------------------------------------------------------------------

    def check_options(self, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
        """Raises :class:`SamplerError` naming a bad option."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SamplerError(f"max_new_tokens={max_new_tokens!r} is not allowed: use an integer >= 1")
        if not temperature >= 0:
            raise SamplerError(f"temperature={temperature!r} is not allowed: use a number >= 0 (0: greedy)")
        if not isinstance(top_k, int) or top_k < 0:
            raise SamplerError(f"top_k={top_k!r} is not allowed: use an integer >= 0 (0: no cut)")
        if not 0 < top_p <= 1:
            raise SamplerError(f"top_p={top_p!r} is not allowed: use a number in (0, 1]")

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                     keep_logits: bool = False, chunk: int | None = None) -> list[dict]:
        """Continuations of token-id prompts, ``batch_size`` at a time: ``[{"tokens": ids (end token
        excluded), "step_logits": [n, V] with keep_logits}]``. Greedy unless ``temperature`` > 0;
        ``stop`` strings (with a tokenizer) end a row between chunks of ``chunk`` steps."""
        self.check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        prompts = [list(map(int, p)) for p in prompts]
        for n, p in enumerate(prompts):
            if not p:
                raise SamplerError(f"prompt {n + 1} is empty: give at least one token")
            if len(p) >= self.max_length:
                raise SamplerError(f"prompt {n + 1} has {len(p)} tokens, longer than the cache allows: at most "
                                   f"{self.max_length - 1} (max_position_embeddings {self.max_length}) leaving "
                                   "room for one new token")
        out: list[dict] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[start:start + self.batch_size], max_new_tokens, temperature, top_k, top_p,
                               seed + start, list(stop), keep_logits, chunk)
        return out

    def _batch(self, prompts, max_new, temperature, top_k, top_p, seed, stop, keep_logits, chunk):  # long: one batch
        longest = max(len(p) for p in prompts)
        new = min(max_new, self.max_length - longest)
        length = _round_up(longest, self.length_multiple)
        rows = 1 << (len(prompts) - 1).bit_length()  # batch rounded up to a power of two: few programs
        ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for r, p in enumerate(prompts):
            ids[r, length - len(p):], mask[r, length - len(p):] = p, 1
        mask[len(prompts):, -1] = 1  # filler rows: one token, discarded
        chunk = min(int(chunk or (32 if stop else new)), new)
        chunks = -(-new // chunk)
        cache = self._model.init_cache(rows, length + chunks * chunk)
        logits, cache = self._prefill(self.state, jnp.asarray(ids), jnp.asarray(mask), cache)
        sample = temperature > 0
        options = {"temperature": jnp.float32(temperature if sample else 1.0), "top_k": jnp.int32(top_k),
                   "top_p": jnp.float32(top_p)}
        key = jax.random.key(seed)
        done = np.zeros((rows,), bool)
        done[len(prompts):] = True
        pieces, kept = [], []
        for c in range(chunks):
            res = self._decode(self.state, logits, cache, key, jnp.asarray(done), jnp.int32(c * chunk), options,
                               steps=chunk, sample=sample, keep_logits=keep_logits)
            logits, cache = res["logits"], res["cache"]
            pieces.append(np.asarray(res["tokens"]))
            if keep_logits:
                kept.append(np.asarray(res["step_logits"]))
            done = np.asarray(res["done"]).copy()
            if stop and self.tokenizer is not None:
                so_far = np.concatenate(pieces, axis=1)
                for r in range(len(prompts)):
                    if not done[r] and any(s in self._text(self._until_end(so_far[r])) for s in stop):
                        done[r] = True
            if done.all():
                break
        tokens = np.concatenate(pieces, axis=1)[:, :new]
        out = []
        for r in range(len(prompts)):
            row = {"tokens": self._until_end(tokens[r])}
            if keep_logits:
                row["step_logits"] = np.concatenate(kept, axis=1)[r, :len(row["tokens"]) + 1][:new]
            out.append(row)
        return out

    def _until_end(self, row) -> list[int]:
        row = [int(t) for t in row]
        ends = [i for i, t in enumerate(row) if t in self.eos_ids]
        return row[:ends[0]] if ends else row

    def _text(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # -- text ---------------------------------------------------------------------------------------

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """A prompt's token ids: the tokenizer's own rule (``<bos>`` as its post-processor adds it);
        with ``chat``, the chat template rendered around one user turn, then encoded without adding
        special tokens (the template writes them)."""
        if self.tokenizer is None:
            raise SamplerError("text prompts need a tokenizer: this model has none")
        if chat:
            if not self.template:
                raise SamplerError("the tokenizer has no chat template: drop --chat, or use a folder whose "
                                   "tokenizer_config.json has a chat_template")
            bos = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else ""
            text = apply_chat_template(self.template, [{"role": "user", "content": prompt}], bos_token=bos or "")
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(prompt).ids)

    def generate(self, prompts: Sequence[str], *, stop: Sequence[str] = (), chat: bool = False,
                 **options: Any) -> list[Completion]:
        """Text continuations of ``prompts`` (:meth:`generate_ids`' options): ``text`` decoded with
        special tokens skipped and cut before the first stop string, ``tokens`` the ids up to there."""
        for n, p in enumerate(prompts):
            if not p:
                raise SamplerError(f"prompt {n + 1} is empty: give some text")
        encoded = [self.encode(p, chat=chat) for p in prompts]
        rows = self.generate_ids(encoded, stop=stop, **options)
        return [Completion(p, *self._cut(r["tokens"], stop)) for p, r in zip(prompts, rows)]

    def _cut(self, tokens: list[int], stop: Sequence[str]) -> tuple[str, list[int]]:
        text = self._text(tokens)
        hits = [text.index(s) for s in stop if s and s in text]
        if not hits:
            return text, tokens
        n = next(n for n in range(1, len(tokens) + 1) if any(s and s in self._text(tokens[:n]) for s in stop))
        return text[:min(hits)], tokens[:n]
