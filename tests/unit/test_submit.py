"""vlm-submit's checks and rendering, without a cluster: bad requests fail before anything is written,
#SBATCH values stay in a safe set, and every value reaching the shell comes back literally."""
import subprocess

import pytest

from vlmtrain.submit import JobRequest, SubmitError, render, validate

HOSTILE = ["a b", "it's", 'say "hi"', "$(touch /tmp/x)", "`id`", "two\nlines", "back\\slash", "*", "", "-e"]


@pytest.mark.parametrize("request_, message", [
    (JobRequest("train", (), nodes=0), r"--nodes 0: a job needs at least 1 node"),
    (JobRequest("train", (), time="1:2:3:4"), r"--time '1:2:3:4': use minutes, HH:MM:SS"),
    (JobRequest("train", (), time="soon"), r"--time 'soon'"),
    (JobRequest("train", (), job_name="x\n#SBATCH --uid=0"), r"--job-name .*cannot be quoted.*'\\n'"),
    (JobRequest("train", (), partition="gpu part"), r"--partition 'gpu part'.*\(found ' '\)"),
    (JobRequest("train", (), sbatch=("--comment=$(id)",)), r"--sbatch .*'\$', '\(', '\)'"),
    (JobRequest("train", (), sbatch=("mail-type=END",)), r"give an sbatch option"),
    (JobRequest("train", (), gpus_per_node=4, ranks_per_node=2), r"one rank per GPU"),
    (JobRequest("train", (), cpus_per_node=3, ranks_per_node=2), r"cannot be split evenly"),
    (JobRequest("train", (), signal_seconds=0), r"--signal-seconds 0"),
])
def test_invalid_requests_fail_with_the_flag_and_the_fix(request_, message):
    with pytest.raises(SubmitError, match=message):
        validate(request_)


def test_valid_time_formats_pass():
    for value in ("90", "30:00", "12:00:00", "2-00", "2-12:30", "1-00:00:00"):
        validate(JobRequest("train", (), time=value))


def test_the_script_has_the_resources_and_its_arguments_arrive_literally(tmp_path):
    request = JobRequest("train", ("--config", "c.yaml", *HOSTILE), nodes=2, gpus_per_node=4, time="1:00:00",
                         partition="gpu", account="proj1", sbatch=("--mail-type=END",), signal_seconds=300)
    script = render(request, tmp_path / "run", tmp_path / "work dir $(x)", "/opt/py thon/bin/python")
    lines = script.splitlines()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --time=1:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                     "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --mail-type=END",
                     f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out"):
        assert expected in lines
    # The header up to the template (cd, exports, arguments) run by bash gives every value back unchanged.
    header = script.split("\n# vlm-train on SLURM")[0].replace("cd -- ", "printf '%s\\0' ")
    shown = subprocess.run(["bash", "-c", header + '\nprintf "%s\\0" "$VLM_PYTHON" "$@"'],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert shown.split("\0")[:-1] == [f"{tmp_path}/work dir $(x)", "/opt/py thon/bin/python", "--config", "c.yaml",
                                       *HOSTILE]
    assert not (tmp_path / "x").exists()


def test_a_run_directory_sbatch_cannot_hold_keeps_the_log_in_the_working_directory(tmp_path):
    script = render(JobRequest("curate", ("c.yaml",)), tmp_path / "it's here", tmp_path, "python3")
    assert "--output" not in script and "#SBATCH --ntasks-per-node=1" in script


def test_the_torchrun_launcher_runs_one_task_per_node_with_all_its_ranks(tmp_path):
    script = render(JobRequest("train", ("--config", "c.yaml"), nodes=2, gpus_per_node=8, launcher="torchrun"),
                    tmp_path, tmp_path, "python3")
    assert "#SBATCH --ntasks-per-node=1" in script.splitlines()
    assert "VLM_LAUNCHER=torchrun VLM_RANKS_PER_NODE=8" in script
    assert "--rdzv-backend=c10d" in script
