"""Seeded checkpoints are in the real diffusers layout and load through from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sprintrt.errors import InvalidInputError, ModelLoadError
from sprintrt.export.checkpoint import arch_configs, load_pipeline, make_checkpoint
from sprintrt.files import model_identity


def test_layout_and_sprint_flags(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline"
    assert index["scheduler"] == ["diffusers", "SCMScheduler"]
    assert index["text_encoder"] == ["transformers", "Gemma2Model"]
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    t = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    assert t["guidance_embeds"] and t["qk_norm"] == "rms_norm_across_heads" and t["patch_size"] == 1
    assert t["mlp_ratio"] == 2.5 and t["sample_size"] == 32
    assert list(tiny_checkpoint.rglob("*.bin")) == []  # safetensors only
    assert len(list(tiny_checkpoint.rglob("*.safetensors"))) == 4  # text encoder, transformer, VAE, ControlNet


def test_loads_through_from_pretrained(reference_pipe):
    assert type(reference_pipe).__name__ == "SanaSprintPipeline"
    assert reference_pipe.vae_scale_factor == 32
    assert reference_pipe.text_encoder.config._attn_implementation == "eager"
    assert reference_pipe.tokenizer("a cat").input_ids[0] == reference_pipe.tokenizer.bos_token_id == 2


def test_same_seed_same_weights(tiny_checkpoint, tmp_path):
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0, controlnet=True)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert model_identity(again) == model_identity(tiny_checkpoint) != model_identity(other)


@pytest.mark.parametrize("arch,layers,heads", [("0.6B", 28, 36), ("1.6B", 20, 70)])
def test_real_architectures(arch, layers, heads):
    cfg = arch_configs(arch)
    assert cfg["transformer"]["num_layers"] == layers and cfg["transformer"]["num_attention_heads"] == heads
    assert cfg["transformer"]["caption_channels"] == cfg["text_encoder"]["hidden_size"] == 2304
    assert cfg["vae"]["decoder_block_out_channels"] == [128, 256, 512, 512, 1024, 1024]
    assert cfg["text_encoder"]["num_hidden_layers"] == 26


def test_bad_arch_and_existing_dir(tiny_checkpoint):
    with pytest.raises(InvalidInputError, match="arch='3B'"):
        arch_configs("3B")
    with pytest.raises(InvalidInputError, match="already holds a checkpoint"):
        make_checkpoint(tiny_checkpoint, "tiny")


def test_missing_model_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_pipeline(tmp_path / "nothing-here")


def test_a_directory_with_other_files_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        make_checkpoint(out, "tiny")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert make_checkpoint(tmp_path / "empty-ok", "tiny").joinpath("model_index.json").is_file()


def test_a_run_that_loses_the_race_or_fails_leaves_nothing_of_its_own(tmp_path, monkeypatch):
    from diffusers import SanaSprintPipeline

    out = tmp_path / "ckpt"
    save = SanaSprintPipeline.save_pretrained

    def another_process_fills_out(self, path, **kwargs):  # it finishes while this run is writing
        save(self, path, **kwargs)
        out.mkdir()
        (out / "model_index.json").write_text("{}")

    monkeypatch.setattr(SanaSprintPipeline, "save_pretrained", another_process_fills_out)
    with pytest.raises(InvalidInputError, match="filled by another process"):
        make_checkpoint(out, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .partial directory left behind

    def crash(self, path, **kwargs):
        (Path(path) / "half").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(SanaSprintPipeline, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(tmp_path / "other", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
