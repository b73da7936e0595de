"""``python -m fraqat_jax.eval.harness ARGS``: lm-evaluation-harness's own command line with our model
registered as ``fraqat`` (lm-eval finds outside models only once their module is imported; it has no
plugin entry point). ``ARGS`` are lm-eval's, e.g.::

    python -m fraqat_jax.eval.harness --model fraqat --model_args workdir=RUN,model=student_frozen \\
        --tasks boolq --include_path MY_TASKS --apply_chat_template --output_path OUT --log_samples

See :mod:`fraqat_jax.eval.lm_eval_adapter` for ``model_args``. Needs ``pip install
'fraqat_jax[lm-eval]'``; without it the command prints one line and exits 2.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs lm-eval's command line on ``argv`` (default ``sys.argv[1:]``); returns its exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import fraqat_jax.eval.lm_eval_adapter  # noqa: F401  (registers "fraqat")
    except ImportError as e:
        print(f"python -m fraqat_jax.eval.harness needs lm-eval ({e}): pip install 'fraqat_jax[lm-eval]'",
              file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's usage errors and lm-eval's own exits
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
