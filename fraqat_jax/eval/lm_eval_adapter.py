"""Our language models inside EleutherAI's lm-evaluation-harness (``pip install 'fraqat_jax[lm-eval]'``).

Importing this module registers :class:`FraqatLM` as the harness model ``fraqat``; lm-eval's own
command line finds it through ``python -m fraqat_jax.eval.harness`` (which takes lm-eval's
arguments)::

    import lm_eval
    import fraqat_jax.eval.lm_eval_adapter  # registers "fraqat"

    lm_eval.simple_evaluate(model="fraqat", model_args="workdir=RUN,model=student", tasks=["boolq"])
    lm_eval.simple_evaluate(model="fraqat", model_args="pretrained=TRANSFORMERS_FOLDER", tasks=[...])
    lm_eval.simple_evaluate(model=FraqatLM(lm=nnx_model, tokenizer=tokenizer), tasks=[...])

``model_args``: ``workdir`` (a finished text run) with ``model`` one of ``teacher``, ``student`` (as
trained: fake-quantized weights and activations), ``student_frozen`` (the integer serving form) and
optionally ``step``; or ``pretrained`` (a transformers folder, loaded by
:func:`fraqat_jax.models.from_transformers`). ``batch_size`` (default 8) and ``max_length`` (default
the model's ``max_position_embeddings``) apply to all.

Requests are served by :class:`fraqat_jax.eval.text.TokenScorer`, the scorer of ``python -m
fraqat_jax.eval --tasks``: ``loglikelihood`` (lm-eval's own context/continuation split, BOS as the
tokenizer adds it), ``loglikelihood_rolling`` (lm-eval's disjoint rolling windows of ``max_length``
tokens) and ``generate_until`` (:class:`fraqat_jax.models.sampler.Sampler`, the one decoder: batched,
left-padded, key-value cache; greedy unless ``do_sample`` with ``temperature`` > 0, ``top_k``,
``top_p``; stopping at the end tokens, any of the ``until`` strings or ``max_gen_toks``). Chat
templates (``--apply_chat_template``): the folder's ``chat_template`` (``tokenizer_config.json`` or
``chat_template.jinja``). The harness itself imports torch; this module does not.
"""

from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from fraqat_jax.eval.text import TokenScorer
from fraqat_jax.models.sampler import Sampler, apply_chat_template, chat_template, end_token_ids

__all__ = ["FraqatLM"]

MODELS = ("teacher", "student", "student_frozen")


def _special_ids(config: dict) -> tuple[int | None, int | None]:
    def first(value):
        return value[0] if isinstance(value, list) and value else value

    bos, eos = first(config.get("bos_token_id")), first(config.get("eos_token_id"))
    return (None if bos is None else int(bos)), (None if eos is None else int(eos))


@register_model("fraqat")
class FraqatLM(TemplateLM):
    """An lm-eval ``LM`` over an NNX causal LM and a ``tokenizers.Tokenizer`` (see the module docstring).

    Args:
      lm: the model object (``lm(input_ids, attention_mask=mask) -> logits``); or give ``workdir`` or
        ``pretrained``.
      tokenizer: the ``tokenizers.Tokenizer`` (with ``lm``).
      workdir, model, step: a text run and which of its models (``teacher``, ``student``,
        ``student_frozen``) at which checkpoint (default the latest).
      pretrained: a transformers folder.
      batch_size: sequences per forward pass; max_length: longest sequence fed to the model (longer
        ones keep their last tokens, as the harness does).
      max_gen_toks: default generation budget of ``generate_until``.
    """

    def __init__(self, lm=None, tokenizer=None, *, workdir: str | None = None, model: str = "student",
                 step: int | str | None = None, pretrained: str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, **unused):
        super().__init__()
        config: dict = {}
        folder = None
        if sum(x is not None for x in (lm, workdir, pretrained)) != 1:
            raise ValueError("FraqatLM takes exactly one of lm=MODEL (with tokenizer=), workdir=RUN or "
                             f"pretrained=FOLDER; got lm={lm is not None}, workdir={workdir!r}, "
                             f"pretrained={pretrained!r}")
        if workdir is not None:
            if model not in MODELS:
                raise ValueError(f"model={model!r} is not one of {', '.join(MODELS)}")
            from fraqat_jax.eval.text import load_text_run

            run = load_text_run(workdir, step=None if step in (None, "") else int(step),
                                frozen=model == "student_frozen")
            lm, tokenizer, config = run.models[model], run.tokenizer, dict(run.teacher.config)
            from fraqat_jax.eval.text import teacher_folder

            folder = teacher_folder(run.teacher, run.cfg)
        elif pretrained is not None:
            from fraqat_jax.data.text import load_tokenizer
            from fraqat_jax.models import from_transformers

            lm = from_transformers(pretrained)
            folder = pretrained
            tokenizer = load_tokenizer(pretrained, f"pretrained={pretrained}")
            config = dict(lm.config)
        else:
            if tokenizer is None:
                raise ValueError("FraqatLM(lm=...) needs tokenizer= (a tokenizers.Tokenizer)")
            config = dict(getattr(lm, "config", {}) or {})
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = _special_ids(config)
        if self.eos_id is None:
            self.eos_id = tokenizer.token_to_id("<eos>") or tokenizer.token_to_id("</s>") or 0
        self._max_length = int(max_length) if max_length not in (None, "") else int(
            config.get("max_position_embeddings", 2048))
        self.max_gen_toks = int(max_gen_toks)
        pad = config.get("pad_token_id")
        batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # the harness may pass None or 'auto'
        self.scorer = TokenScorer(lm, pad_id=self.eos_id if pad is None else int(pad), batch_size=batch_size,
                                  length_multiple=32, max_length=self._max_length)
        self.folder, self.template = folder, chat_template(folder)
        self.sampler = Sampler(lm, tokenizer, eos_ids=end_token_ids(folder, config, tokenizer) or (self.eos_id,),
                               pad_id=self.scorer.pad_id, max_length=self._max_length, template=self.template,
                               batch_size=batch_size)

    # -- what the harness asks of a TemplateLM ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.eos_id if self.bos_id is None else self.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # as the harness: the tokenizer's own rule, unless BOS is already there
            bos_text = None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)
            add_special_tokens = not (bos_text and string.startswith(bos_text))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owners.append(n)
        totals = [0.0] * len(requests)
        for (score, _), n in zip(self.scorer.loglikelihoods(windows), owners):
            totals[n] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation options decode as one batch (see the module docstring)."""
        groups: dict[tuple, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(self._options(req.args[1]), []).append(n)
        out = [""] * len(requests)
        for (until, budget, temperature, top_k, top_p), members in groups.items():
            prompts = [self.tok_encode(requests[n].args[0])[-(self.max_length - 1):] for n in members]
            rows = self.sampler.generate_ids(prompts, max_new_tokens=budget, temperature=temperature, top_k=top_k,
                                             top_p=top_p, stop=until)
            for n, row in zip(members, rows):
                text = self.tokenizer.decode(row["tokens"], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                out[n] = text
                self.cache_hook.add_partial("generate_until", (requests[n].args[0], requests[n].args[1]), text)
        return out

    def _options(self, gen_kwargs) -> tuple:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = tuple([until] if isinstance(until, str) else until)
        budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", False):
            temperature = 0.0  # lm-eval's rule: greedy unless do_sample
        return (until, budget, temperature, int(gen_kwargs.get("top_k", 0) or 0),
                float(gen_kwargs.get("top_p", 1.0) or 1.0))

    # -- chat templates --------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return (self.folder or "fraqat").rstrip("/").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if not self.template:
            raise ValueError(f"the tokenizer of {self.folder or 'this model'!r} has no chat template "
                             "(tokenizer_config.json chat_template or chat_template.jinja): drop --apply_chat_template")
        return self.template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        template = self.chat_template(True)
        bos = "" if self.bos_id is None else (self.tokenizer.id_to_token(self.bos_id) or "")
        eos = self.tokenizer.id_to_token(self.eos_id) or ""
        return apply_chat_template(template, chat_history, bos_token=bos, eos_token=eos,
                                   add_generation_prompt=add_generation_prompt)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``model_args`` win over the harness's own ``batch_size`` (its other settings, e.g. ``device``,
        do not apply)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size",)}
        return cls(**{**extra, **dict(arg_dict)})
