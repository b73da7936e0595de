"""The text family behind the :class:`fraqat_jax.family.Family` interface: causal language models
(today the Gemma-2 port, ``Gemma2ForCausalLM``), the object :data:`GEMMA2` (named ``gemma2``),
registered through the ``fraqat_jax.families`` entry points.

- Teachers (``teacher=``): ``builtin:lm`` (the shipped tiny Gemma-2, :data:`BUILTIN_TEACHER`), a
  transformers model folder (``config.json`` naming ``Gemma2ForCausalLM``, safetensors, and a
  ``tokenizer.json`` for text data), or ``preset:gemma-2-2b`` / ``-9b`` / ``-27b`` (random weights:
  for planning; ``teacher_config`` overrides keys).
- Data (``data=``): ``text:PATH`` and ``tfds:NAME[:SPLIT]`` (:mod:`fraqat_jax.data.text`: token
  windows of ``seq_len`` tokens, each starting with ``<bos>``) or ``datafree``: LLM-QAT's sequences
  sampled from the teacher (a random first token, three greedy ones, then draws from its
  next-token distribution; :mod:`fraqat_jax.text.generate`).
- Training inputs: the windows themselves, ``{"input_ids", "attention_mask"}`` (no randomness),
  plus ``loss_kind`` (0: ``kl``, 1: ``mse``; ``Family.loss`` is not handed the config).
- Loss (``loss=``): forward ``KL(teacher || student)`` of the next-token distributions at every
  position (LLM-QAT's objective; default) or the mean squared logit difference
  (:mod:`fraqat_jax.text.loss`), averaged over real tokens (``attention_mask``).
- Quantized by default: every ``Linear`` layer, which in Gemma-2 are the seven projections of each
  block (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
  ``down_proj``); the tied embedding / LM head and the norms stay in float, as the paper quantizes
  linear layers only.
- Samples: at each change of bit-width, ``samples/step_*_bits_*.txt`` holds the teacher's and the
  student's greedy continuations (``sample_tokens`` new tokens) of ``num_samples`` fixed prompts,
  the first :data:`PROMPT_TOKENS` tokens of the first held-out windows.
- Held-out windows (validation, calibration): the tail of the data the source holds out
  (``TextSource.heldout``); for ``datafree``, sequences drawn with the ``validation`` stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib.resources import files
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.data.datafree import DataFreeSource
from fraqat_jax.data.sources import DataSourceError
from fraqat_jax.data.streams import stream
from fraqat_jax.data.text import SpecialTokens, check_seq_len, load_tokenizer, make_text_source
from fraqat_jax.family import ConfigError, Family
from fraqat_jax.family.settings import int_at_least, one_of, setting
from fraqat_jax.models.convert import read_config
from fraqat_jax.models.gemma2 import GEMMA2_PRESETS
from fraqat_jax.models.transformers_folder import TRANSFORMERS_CLASSES, from_transformers, transformers_class
from fraqat_jax.text.generate import GREEDY_FIRST_TOKENS, continue_tokens, datafree_prompts
from fraqat_jax.text.loss import LOSSES
from fraqat_jax.text.samples import write_samples
from fraqat_jax.models.sampler import Sampler, SamplerError, chat_template, end_token_ids

__all__ = ["BUILTIN_TEACHER", "GEMMA2", "LOSS_NAMES", "PROMPT_TOKENS", "TextConfig", "TextFamily",
           "builtin_teacher_dir"]

#: ``teacher=`` value of the shipped tiny Gemma-2 (``python -m fraqat_jax.pretrain.text`` builds it).
BUILTIN_TEACHER = "builtin:lm"
LOSS_NAMES = tuple(LOSSES)  # ("kl", "mse"): loss_kind 0, 1
PROMPT_TOKENS = 16
DATA_FORMS = "text:PATH (a .txt / .jsonl file or a folder of them), tfds:NAME[:SPLIT] or datafree"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text family's own config keys."""

    #: tokens per training window, <bos> included
    seq_len: int = setting(128, "text: tokens per training window, <bos> included (at most the teacher's "
                           "max_position_embeddings)", int_at_least(2))
    #: the distillation loss over the next-token distributions
    loss: str = setting("kl", "text: distillation loss over the next-token distributions at every position: kl "
                        "(forward KL(teacher || student), LLM-QAT's) | mse (of the logits)", one_of(*LOSS_NAMES))
    #: new tokens of each greedy continuation in the sample files
    sample_tokens: int = setting(32, "text: new tokens of each greedy continuation in the sample files",
                                 int_at_least(1))


def builtin_teacher_dir() -> str:
    """The shipped tiny Gemma-2's transformers folder (``fraqat_jax/assets/tiny_gemma2``)."""
    return str(files("fraqat_jax").joinpath("assets", "tiny_gemma2"))


def _overrides(cfg) -> dict:
    try:
        value = json.loads(cfg.teacher_config) if cfg.teacher_config else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher_config={cfg.teacher_config!r} is not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"teacher_config={cfg.teacher_config!r} is not a JSON object")
    return value


def _build_options(cfg) -> dict:
    return {"dtype": _DTYPES[cfg.dtype], "param_dtype": _DTYPES[cfg.param_dtype], "remat": cfg.remat,
            "scan_layers": bool(cfg.scan_layers), "attention": cfg.attention}


class _Sampler:
    """``sample(params, prompts) -> {"input_ids" [B, T], "prompt_len"}`` over one jitted program."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, params, prompts):
        return self.jitted(params, prompts)


class _DataFreeTextSource(DataFreeSource):
    """LLM-QAT's sequences as a data source, with held-out sequences from the ``validation`` stream."""

    def __init__(self, generate, element_spec, *, seed: int, heldout_seed: int, tokenizer=None):
        super().__init__(generate, element_spec, seed=seed)
        self.heldout_seed, self.tokenizer = int(heldout_seed), tokenizer

    def heldout(self, num: int | None = None) -> dict[str, np.ndarray]:
        out = self.generate(jax.random.key(self.heldout_seed), int(num or 16))
        return {k: np.asarray(v) for k, v in out.items()}


class TextFamily(Family):
    """Causal language models (see the module docstring)."""

    name = "gemma2"
    model_classes = tuple(TRANSFORMERS_CLASSES)
    Config = TextConfig
    evaluation = "text"
    export_format = "transformers"
    #: the transformers class of the exported folder
    transformers_class = "Gemma2ForCausalLM"

    def __init__(self):
        self._tokenizer = None  # the last run's tokenizer, set by sample_prompts for write_samples

    # -- configuration ---------------------------------------------------------------------------

    def validate_config(self, cfg) -> None:
        spec = cfg.data
        if not (spec == "datafree" or spec.startswith("text:") or spec.startswith("tfds:")):
            raise ConfigError(f"data={spec!r} is not allowed for a {self.name} teacher: use {DATA_FORMS}")
        # A text:PATH that does not exist is named when the source is opened (DataSourceError, exit 2), so
        # that planning, which never opens the data, works on a machine without it.

    # -- teachers --------------------------------------------------------------------------------

    def teacher_folder(self, cfg) -> str | None:
        """The transformers folder of ``cfg.teacher`` (its tokenizer lives there); None for a preset."""
        if cfg.teacher == BUILTIN_TEACHER:
            return builtin_teacher_dir()
        if cfg.teacher.startswith("preset:"):
            return None
        return cfg.teacher

    def port(self, class_name: str) -> type:
        return TRANSFORMERS_CLASSES[class_name]

    def teacher_class(self, teacher: str) -> str | None:
        if teacher == BUILTIN_TEACHER:
            return "Gemma2ForCausalLM"
        if teacher.startswith("preset:"):
            name = teacher[len("preset:"):]
            return GEMMA2_PRESETS[name][0] if name in GEMMA2_PRESETS else None
        if not os.path.isfile(os.path.join(teacher, "config.json")):
            return None
        config = read_config(teacher)  # a broken config.json: one line naming it
        if "_class_name" in config:  # a diffusers folder
            return None
        try:
            return transformers_class(config).__name__
        except ValueError:
            names = config.get("architectures") or [config.get("model_type")]
            return str(names[0]) if names and names[0] else None

    def teacher_spec(self, cfg) -> tuple[type, dict]:
        if cfg.teacher.startswith("preset:"):
            name = cfg.teacher[len("preset:"):]
            if name not in GEMMA2_PRESETS:
                raise ConfigError(f"teacher preset {name!r} is not a language model; allowed: "
                                  f"{', '.join(GEMMA2_PRESETS)}")
            cls_name, config = GEMMA2_PRESETS[name]
            return TRANSFORMERS_CLASSES[cls_name], {**config, **_overrides(cfg)}
        folder = self.teacher_folder(cfg)
        if cfg.teacher == BUILTIN_TEACHER and not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"the built-in teacher {BUILTIN_TEACHER!r} is missing ({folder}); run "
                              "python -m fraqat_jax.pretrain.text")
        config = read_config(folder)
        try:
            return transformers_class(config, os.path.join(folder, "config.json")), config
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def load_teacher(self, cfg):
        if cfg.teacher.startswith("preset:"):
            build = self.teacher_builder(cfg)
            graph = nnx.graphdef(nnx.eval_shape(build))
            return nnx.merge(graph, jax.jit(lambda: nnx.state(build()))())
        self.teacher_spec(cfg)  # the built-in teacher's absence, an unsupported class: named here
        return from_transformers(self.teacher_folder(cfg), **_build_options(cfg))

    def teacher_builder(self, cfg) -> Callable:
        cls, config = self.teacher_spec(cfg)
        return lambda: cls(config, rngs=nnx.Rngs(cfg.seed), **_build_options(cfg))

    # -- data and inputs ---------------------------------------------------------------------------

    def make_source(self, cfg, model_config, sample_teacher=None, *, seed: int | None = None):
        spec, seq_len = cfg.data, int(cfg.seq_len)
        folder = self.teacher_folder(cfg)
        if spec != "datafree":
            if folder is None:
                raise DataSourceError(spec, f"cannot be tokenized: teacher={cfg.teacher!r} is a preset with no "
                                            "folder and no tokenizer.json; use a transformers folder or data=datafree")
            source = make_text_source(spec, tokenizer_dir=folder, model_config=dict(model_config), seq_len=seq_len,
                                      seed=stream(cfg.seed, "data") if seed is None else seed,
                                      data_dir=cfg.data_dir or None)
            return source
        check_seq_len(seq_len, model_config.get("max_position_embeddings"), spec)
        if sample_teacher is None:
            raise ConfigError("data=datafree draws its sequences from the teacher: make_source needs sample_teacher")
        tokens = SpecialTokens.from_config(dict(model_config), spec)
        vocab = int(model_config["vocab_size"])
        excluded = sorted({tokens.bos, tokens.eos, tokens.pad})

        def generate(key, n):
            k_first, k_rest = jax.random.split(key)
            buf = datafree_prompts(k_first, n, seq_len, bos=tokens.bos, vocab_size=vocab, excluded=excluded)
            out = sample_teacher({"input_ids": buf, "prompt_len": jnp.int32(min(2, seq_len)),
                                  "greedy_until": jnp.int32(2 + GREEDY_FIRST_TOKENS),
                                  "key": jax.random.key_data(k_rest)})
            ids = jnp.asarray(out["input_ids"])
            return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}

        element = {"input_ids": ((seq_len,), np.dtype(np.int32)), "attention_mask": ((seq_len,), np.dtype(np.int32))}
        tokenizer = None
        if folder is not None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer = load_tokenizer(folder, spec)
        return _DataFreeTextSource(generate, element, seed=stream(cfg.seed, "datafree") if seed is None else seed,
                                   heldout_seed=stream(cfg.seed, "validation"), tokenizer=tokenizer)

    def training_inputs(self, key, batch, cfg):
        ids = jnp.asarray(batch["input_ids"], jnp.int32)
        mask = jnp.asarray(batch.get("attention_mask", jnp.ones_like(ids)), jnp.int32)
        return {"input_ids": ids, "attention_mask": mask,
                "loss_kind": jnp.full((ids.shape[0],), LOSS_NAMES.index(cfg.loss), jnp.int32)}

    def apply(self, model, inputs):
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"])

    def loss(self, student_out, teacher_out, inputs):
        mask = inputs["attention_mask"]
        kind = inputs.get("loss_kind")
        if kind is None:
            return LOSSES["kl"](teacher_out, student_out, mask)
        branches = [lambda t, s, m, f=f: f(t, s, m) for f in LOSSES.values()]
        return jax.lax.switch(jnp.clip(kind[0], 0, len(LOSS_NAMES) - 1), branches, teacher_out, student_out, mask)

    def heldout_inputs(self, cfg, model_config, rows, key, num, sample_teacher=None):
        if rows is None:
            source = self.make_source(cfg, model_config, sample_teacher)
            rows = source.generate(key, num)
        rows = {k: np.asarray(v)[:num] for k, v in rows.items() if k in ("input_ids", "attention_mask")}
        return self.training_inputs(key, rows, cfg)

    def example_batch(self, model_config, **size) -> dict:
        """``{"input_ids", "attention_mask"}`` of ``seq_len`` tokens (``size["seq_len"]``, default
        :class:`TextConfig`'s, at most ``max_position_embeddings``)."""
        seq_len = int(size.get("seq_len") or TextConfig.seq_len)
        return {"input_ids": ((seq_len,), "int32"), "attention_mask": ((seq_len,), "int32")}

    def example_size(self, cfg, model_config) -> dict:
        """``{"seq_len": cfg.seq_len}``: the windows the run trains on."""
        return {"seq_len": int(cfg.seq_len)}

    # -- phone export --------------------------------------------------------------------------------

    decodes_with_cache = True

    def cached_step(self, model):
        """``model`` as one fixed-shape step against a host-side KV cache (the prefill and decode
        graphs of ``export --format qnn``): :class:`fraqat_jax.text.kv_step.Gemma2KVStep`."""
        from fraqat_jax.text.kv_step import Gemma2KVStep

        return Gemma2KVStep(model)

    # -- samples -----------------------------------------------------------------------------------

    def teacher_sampler(self, cfg, build, out_shardings=None, **options):
        def sample(params, prompts):
            model = build(params)
            key = jax.random.wrap_key_data(prompts["key"])
            ids = continue_tokens(model, prompts["input_ids"], prompts["prompt_len"],
                                  prompts["greedy_until"], key)
            return {"input_ids": ids, "prompt_len": prompts["prompt_len"]}

        return _Sampler(jax.jit(sample, out_shardings=out_shardings))

    def sample_prompts(self, cfg, model_config, source, num, *, seed=None):
        """The first :data:`PROMPT_TOKENS` tokens of ``num`` held-out windows, followed by room for
        ``sample_tokens`` greedy tokens (within ``max_position_embeddings``)."""
        held = np.asarray(source.heldout(num)["input_ids"])
        p = min(PROMPT_TOKENS, held.shape[1])
        limit = int(model_config.get("max_position_embeddings") or p + int(cfg.sample_tokens))
        total = max(p + 1, min(p + int(cfg.sample_tokens), limit))
        buf = np.zeros((held.shape[0], total), np.int32)
        buf[:, :p] = held[:, :p]
        self._tokenizer = getattr(source, "tokenizer", None)
        return {"input_ids": buf, "prompt_len": np.int32(p), "greedy_until": np.int32(total),
                "key": np.asarray(jax.random.key_data(jax.random.key(stream(cfg.seed, "sample_grid") if seed is None else int(seed))))}

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._tokenizer is None:
            return " ".join(map(str, ids))
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def write_samples(self, path_stem, teacher_samples, student_samples):
        p = int(np.asarray(teacher_samples["prompt_len"]))
        teacher, student = np.asarray(teacher_samples["input_ids"]), np.asarray(student_samples["input_ids"])
        _, step, _, bits = os.path.basename(path_stem).split("_", 3)  # the trainer's step_{step:06d}_bits_{bits:g}
        path = f"{path_stem}.txt"
        write_samples(path, int(step), float(bits), [self.decode(r[:p]) for r in teacher],
                      [self.decode(r[p:]) for r in teacher], [self.decode(r[p:]) for r in student])
        return path, None

    # -- generation (python -m fraqat_jax.generate) -----------------------------------------------

    generates = frozenset({"text"})

    def text_sampler(self, model, cfg, *, batch_size: int = 8) -> Sampler:
        """The one decoder (:class:`fraqat_jax.models.sampler.Sampler`) over ``model`` with the run's
        tokenizer, end tokens and chat template (its teacher folder's); a teacher without a
        ``tokenizer.json`` is a :class:`ConfigError` naming it."""
        folder = self.teacher_folder(cfg)
        if folder is None or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise ConfigError(f"the run's teacher {cfg.teacher!r} has no tokenizer (no tokenizer.json in "
                              f"{folder or 'a preset'}): text generation needs one")
        tokenizer = load_tokenizer(folder, f"teacher={cfg.teacher}")
        return Sampler(model, tokenizer, eos_ids=end_token_ids(folder, dict(model.config), tokenizer),
                       template=chat_template(folder), batch_size=batch_size)

    def generate_text(self, model, cfg, prompts, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                      top_k: int = 0, top_p: float = 1.0, stop=(), chat: bool = False) -> list:
        """Continuations of ``prompts`` (``models.sampler.Completion``: strings carrying their ``tokens``);
        bad input (an empty prompt, one longer than the cache, a bad option) is a :class:`ConfigError`."""
        try:
            return self.text_sampler(model, cfg).generate(list(prompts), max_new_tokens=max_new_tokens,
                                                          temperature=temperature, seed=seed, top_k=top_k, top_p=top_p,
                                                          stop=list(stop), chat=chat)
        except SamplerError as e:
            raise ConfigError(str(e)) from None


#: The Gemma-2 family (what the ``fraqat_jax.families`` entry point names).
GEMMA2 = TextFamily()
