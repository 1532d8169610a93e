"""A run's folder (ride_fast.engine.run_folder): `--overwrite` deletes the run's files and the reports
that the later commands wrote beside its checkpoints, and nothing else."""
import pytest

from ride_fast.engine.run_folder import claim_run_folder

RUN = ["config.yaml", "config_resume_1.yaml", "metrics.jsonl", "train.log", "best.pt", "last.pt", "epoch_0001.pt",
       "per_class_accuracy.json", "per_class_accuracy.png"]
LATER = ["routed.pt", "routed_config.yaml", "routed_eval.json", "routed_usage.png",  # route
         "best_test_eval.json", "best_test_usage.png", "routed_test_eval.json", "routed_test_usage.png",  # eval
         "routed_test_sweep.json", "routed_test_sweep.png",  # eval --sweep
         "confusion.json", "confusion.png", "last_crt.json", "last_crt.png", "last_crt.pt",  # analyze
         "last_tau_norm.json", "last_tau_norm.png", "last_cosine.json", "last_cosine.png"]
OTHERS = ["notes.txt", "results.json", "eval.json", "plot.png"]


def test_overwrite_deletes_the_run_and_the_reports_beside_it_and_nothing_else(tmp_path):
    for name in RUN + LATER + OTHERS:
        (tmp_path / name).write_text(name)
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(ValueError, match="holds another run"):
        claim_run_folder(tmp_path, overwrite=False)
    said = []
    claim_run_folder(tmp_path, overwrite=True, log=said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OTHERS)
    assert "deleted the previous run's files" in said[0]
