"""The whole first slice through the real command-line tools: generate → vlm-train → vlm-eval."""
import json

import pytest
import torch

from tests.conftest import failure_text, run_tool

pytestmark = pytest.mark.e2e


def test_generate_train_and_evaluate_through_the_clis(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "2",
                     f"data.train_shards={small_corpus / 'train'}", f"output_dir={run_dir}",
                     "steps=6", "log_every=2", "data.batch_size=8", "data.shuffle_buffer=16",
                     "optim.warmup_steps=2", "progress=false")
    assert train.returncode == 0, failure_text(train)
    assert (run_dir / "final" / "model.safetensors").is_file()

    results_file = tmp_path / "results.json"
    evaluation = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(run_dir),
                          "--data", str(small_corpus / "eval"), "--out", str(results_file), "--no-progress")
    assert evaluation.returncode == 0, failure_text(evaluation)

    records = {r["dataset"]: r for r in json.loads(results_file.read_text())}
    assert set(records) == {"shapes", "digits", "retrieval"}
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    for name in ("shapes", "digits"):
        metrics = records[name]["metrics"]
        assert records[name]["task"] == "zeroshot_classification"
        assert metrics["num_samples"] == manifest["counts"][f"eval/{name}"]
        assert 0.0 <= metrics["acc1"] <= metrics["acc5"] <= 1.0
    retrieval = records["retrieval"]["metrics"]
    assert retrieval["num_images"] == manifest["counts"]["eval/retrieval"]
    assert retrieval["num_texts"] == 2 * retrieval["num_images"]
    assert 0.0 <= retrieval["text_retrieval_recall@1"] <= retrieval["text_retrieval_recall@10"] <= 1.0
    # The table on the terminal names every dataset.
    for name in records:
        assert name in evaluation.stdout


def test_training_can_start_from_a_checkpoint_open_clip_saved(small_corpus, tmp_path):
    from safetensors.torch import load_file

    from vlmtrain.config import load_train_config
    from vlmtrain.models.clip.openclip import create_openclip_model, from_openclip_state_dict

    model_cfg = load_train_config("configs/train/demo.yaml", ["data.train_shards=x"]).model
    torch.manual_seed(5)
    theirs = create_openclip_model(model_cfg)
    torch.save(theirs.state_dict(), tmp_path / "open_clip.pt")

    run_dir = tmp_path / "run"
    train = run_tool("vlm-train", "--config", "configs/train/demo.yaml", f"data.train_shards={small_corpus / 'train'}",
                     f"output_dir={run_dir}", "steps=1", "optim.warmup_steps=1", "optim.lr=0", "data.batch_size=8",
                     "data.shuffle_buffer=8", f"init_from={tmp_path / 'open_clip.pt'}", "progress=false")
    assert train.returncode == 0, failure_text(train)

    # With a learning rate of 0 the exported weights are exactly the imported ones.
    expected = from_openclip_state_dict(theirs.state_dict(), model_cfg)
    exported = load_file(run_dir / "final" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0, msg=name)
