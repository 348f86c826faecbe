"""The CLI's error contract: a user's mistake is one line and exit status 2; a bug keeps its traceback."""

import pytest

from raystack import cli


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["train", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raystack: error: unknown config key 'train.nope'") and "Traceback" not in err


def test_a_bug_is_not_dressed_up_as_a_user_error(monkeypatch):
    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_train", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["train"])


def test_what_the_jobs_api_refuses_is_a_user_error(monkeypatch, capsys):
    class Client:
        def get_job_info(self, job_id):
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")

    monkeypatch.setattr(cli, "_job_client", lambda address: Client())
    assert cli.main(["status", "raysubmit_nope", "--address", "http://head:8265"]) == 2
    err = capsys.readouterr().err
    assert "the Ray Jobs API at http://head:8265 refused: Request failed with status code 404" in err

