"""The reconstruction command end to end on the real default model (slow)."""

from __future__ import annotations

import json

import pytest

from icmem.cli import build_parser
from icmem.icae.model import ICAE


@pytest.mark.slow
def test_eval_reconstruct_command_prints_json_per_bucket(tmp_path, capsys):
    # a fresh load, not the shared `smollm2` fixture: an ICAE injects LoRA into its base model
    icae = ICAE.from_base("smollm2-135m-instruct", lora_rank=4)
    icae.save_pretrained(tmp_path / "ckpt")
    held_out = tmp_path / "held.txt"
    held_out.write_text("It was a bright cold day in April, and the clocks were striking. " * 30)
    args = build_parser().parse_args(
        ["eval", "reconstruct", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(held_out),
         "--json", "--lengths", "64", "--spans", "1", "--continuation", "16"]
    )  # fmt: skip
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    (bucket,) = result["reconstruction"]
    assert (bucket["length"], bucket["k"], bucket["spans"]) == (64, 16, 1)
    assert 0.0 <= bucket["bleu4_median"] <= 1.0 and bucket["token_ce"] > 0
    (cont,) = result["continuation"]
    assert cont["ppl_raw"] < cont["ppl_slots"]  # an untrained memory knows less than the text
