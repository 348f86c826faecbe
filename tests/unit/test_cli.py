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


def test_deploy_refuses_a_port_another_program_holds_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Serve would otherwise restart its proxy over and over, and the deploy's readiness probe would take the other
    program's answer for Serve's."""
    import socket

    from raystack import cluster
    from raystack.checkpoint import save_artifact
    from raystack.model import GPT, ModelConfig

    config = ModelConfig.from_preset("tiny")
    artifact = save_artifact(str(tmp_path / "model"), config, GPT(config).state_dict())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # HAProxy's other ports of this test's own: the session's Serve (integration tests) may hold the session's ones
    for name in cluster.HAPROXY_PORTS:
        monkeypatch.setenv(name, str(cluster.free_local_port()))
    monkeypatch.setattr(cluster, "init_ray", lambda **kwargs: pytest.fail("Ray started for a deploy it must refuse"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", cluster.free_local_port()))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["deploy", "--model", artifact, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raystack: error: Serve cannot listen on 127.0.0.1:{port} (Address already in use): "
                          "another program listens there") and "--port N" in err and err.count("\n") == 1
    cluster.check_http_port({"host": "127.0.0.1", "port": port})  # free again: no error
    with pytest.raises(cli.ConfigError, match="http_options.host must be an address of this machine"):
        cluster.check_http_port({"host": "192.0.2.123", "port": port})  # TEST-NET: no interface has it
    for bad in ("http", 0, 70000, True):
        with pytest.raises(cli.ConfigError, match=f"port number from 1 to 65535, got {bad!r}"):
            cluster.check_http_port({"host": "127.0.0.1", "port": bad})


def test_deploy_refuses_a_missing_or_torn_artifact_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Each replica would fail on it, constructor_retries times over, and serve.run end in a traceback."""
    from raystack import cluster, commit
    from raystack.checkpoint import save_artifact
    from raystack.model import GPT, ModelConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "init_ray", lambda **kwargs: pytest.fail("Ray started for a deploy it must refuse"))
    assert cli.main(["deploy", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raystack: error: model artifact: ") and "no _SUCCESS manifest" in err
    assert err.count("\n") == 1
    config = ModelConfig.from_preset("tiny")
    artifact = save_artifact(str(tmp_path / "model"), config, GPT(config).state_dict())
    weights = next((tmp_path / "model").glob("*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # sizes are checked; the weights are not read
    assert cli.main(["deploy", "--model", artifact]) == 2
    err = capsys.readouterr().err
    assert "is torn: " in err and "model.safetensors has 100 bytes" in err
    attempt = commit.begin(str(tmp_path / "rows"))  # a committed output that is not a model (a batch job's)
    attempt.write("part-0.parquet", b"rows")
    attempt.commit()
    assert cli.main(["batch", "--model", str(tmp_path / "rows"), "--input", "in.parquet", "--output", "o"]) == 2
    assert "has no ['config.json', 'tokenizer.json', 'model.safetensors']" in capsys.readouterr().err


def test_a_serve_variable_serve_cannot_read_is_named_before_ray_starts(monkeypatch):
    """Serve parses its RAY_SERVE_* variables when ray.serve is first imported, with a traceback (HAProxy's metrics
    port with one that does not even name the variable), so the deploy imports it under a guard first."""
    import os
    import subprocess
    import sys

    from raystack import cluster

    for name in cluster.HAPROXY_PORTS:
        for bad in ("abc", "0", "70000", "-1"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(cli.ConfigError, match=f"{name}='{bad}' is not a TCP port number"):
                cluster.check_serve_env()
        monkeypatch.setenv(name, " 23456 ")  # Serve's int() takes it
        cluster.check_serve_env()
    env = {k: v for k, v in os.environ.items() if k not in cluster.HAPROXY_PORTS}
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "soon"  # a fresh process: this one imported ray.serve already
    done = subprocess.run([sys.executable, "-m", "raystack.cli", "deploy", "--model", "m"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("raystack: error: Ray Serve cannot read its environment: Environment variable "
                           "`RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S` value `soon` cannot be converted to `float`! "
                           "Fix or unset that variable.\n")


@pytest.mark.parametrize("job, module, name", [("train", "raystack.train", "TrainJobConfig"),
                                               ("tune", "raystack.sweep", "SweepSpace"),
                                               ("batch", "raystack.batch", "BatchConfig"),
                                               ("deploy", "raystack.serving", "ServeConfig")])
def test_help_lists_every_key_of_the_jobs_spec_with_its_default(job, module, name, capsys):
    import importlib

    from raystack.config import describe

    with pytest.raises(SystemExit) as exited:
        cli.main([job, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    rows = describe(getattr(importlib.import_module(module), name))
    assert len(rows) >= 8
    lines = {line.split()[0]: line for line in out.splitlines()[out.splitlines().index(
        next(line for line in out.splitlines() if line.startswith(f"{name} keys"))) + 1:] if line.strip()}
    for key, default, doc in rows:
        assert key in lines and default in lines[key], (key, default)
        assert doc[:30] in lines[key]


def test_field_docs_come_from_the_attribute_docstrings():
    from raystack.config import describe
    from raystack.train import TrainJobConfig

    rows = {key: (default, doc) for key, default, doc in describe(TrainJobConfig)}
    assert rows["schedule.steps"] == ("200", "Optimizer steps in the whole run.")
    assert rows["model.preset"][0] == "'tiny'" and rows["scaling.num_workers"][1].startswith("Workers: an int")
    from raystack.batch import BatchConfig  # a section its owner gives other defaults has the owner's
    from raystack.config import load_config

    rows = {key: default for key, default, _ in describe(BatchConfig)}
    assert (rows["sampling.max_tokens"], rows["sampling.seed"], rows["sampling.top_p"]) == ("32", "0", "1.0")
    loaded = load_config(BatchConfig, None, ["model=m", "input=i", "output=o", "sampling.temperature=0.5"])
    assert (loaded.sampling.max_tokens, loaded.sampling.seed, loaded.sampling.temperature) == (32, 0, 0.5)


def test_one_precedence_rule_and_no_silent_winner(tmp_path, capsys):
    from raystack.batch import BatchConfig
    from raystack.config import ConfigError, load_config

    path = tmp_path / "batch.yaml"
    path.write_text("model: from-file\ninput: in\noutput: out\nsampling: {temperature: 0.5, top_k: 5}\n")
    config = load_config(BatchConfig, path, ["sampling.temperature=0.7"], {"model": "from-flag", "mode": None})
    assert (config.model, config.sampling.temperature, config.sampling.top_k, config.mode) == (
        "from-flag", 0.7, 5, "generate")
    with pytest.raises(ConfigError, match="--model 'a' and --set model='b' disagree"):
        load_config(BatchConfig, path, ["model=b"], {"model": "a"})
    assert cli.main(["batch", "--model", "a", "--set", "model=b", "--input", "i", "--output", "o"]) == 2
    assert "disagree" in capsys.readouterr().err
    assert cli.main(["deploy", "--model", "a", "--set", "model=b"]) == 2
    assert "--model 'a' and --set model='b' disagree" in capsys.readouterr().err


def test_every_job_takes_its_spec_file_as_config():
    """One grammar: ``raystack JOB [--config FILE] [--set key=value ...]``; tune's old ``--space`` still works."""
    parser = cli.build_parser()
    assert parser.parse_args(["tune", "--config", "s.yaml"]).space == "s.yaml"
    assert parser.parse_args(["tune", "--space", "s.yaml", "--set", "num_samples=2"]).space == "s.yaml"
    for job in ("train", "batch", "deploy"):
        assert parser.parse_args([job, "--config", "c.yaml", "--set", "a=1"]).overrides == ["a=1"]


def test_tokenizer_and_train_report_commands_refuse_bad_paths_in_one_line(tmp_path, capsys):
    from raystack.checkpoint import save_artifact
    from raystack.model import GPT, ModelConfig

    artifact = save_artifact(str(tmp_path / "model"), ModelConfig.from_preset("tiny"),
                             GPT(ModelConfig.from_preset("tiny")).state_dict())
    (tmp_path / "a-file").write_text("x")
    assert cli.main(["tokenizer", artifact, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file; pass a directory" in capsys.readouterr().err
    assert cli.main(["tokenizer", artifact, "--out", str(tmp_path / "a-file" / "tok")]) == 2
    assert "cannot write there (Not a directory); pass a directory you can write" in capsys.readouterr().err
    assert cli.main(["tokenizer", str(tmp_path / "nowhere"), "--out", str(tmp_path / "tok")]) == 2
    assert "not a committed model artifact" in capsys.readouterr().err
    assert cli.main(["train-report", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl reports" in capsys.readouterr().err
    assert cli.main(["tokenizer", artifact, "--out", str(tmp_path / "tok")]) == 0
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_keys_add_list_revoke_and_their_mistakes(tmp_path, capsys):
    path = str(tmp_path / "tenants.yaml")
    assert cli.main(["keys", "add", "team-a", "--priority", "high", "--tokens-per-minute", "500", "--file", path]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert key.startswith("rsk-")
    assert cli.main(["keys", "list", "--file", path]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and "high" in listing and "tokens_per_minute=500" in listing
    assert key not in listing and "sha256$" not in listing and key.split("-")[1] in listing  # the id, not the key
    assert cli.main(["keys", "revoke", key, "--file", path]) == 0
    assert "revoked key" in capsys.readouterr().out
    for argv, message in ((["keys", "revoke", key, "--file", path], "no key with id"),
                          (["keys", "list", "--file", str(tmp_path / "none.yaml")], "no tenants file at"),
                          (["keys", "add", "a b", "--file", path], "no spaces"),
                          (["keys", "add", "t", "--requests-per-minute", "-1", "--file", path], "must be >= 0"),
                          (["usage", "--window", "forever"], "--window must be a duration")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("raystack: error: ") and message in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("tenants:\n  a:\n    priority: urgent\n")
    assert cli.main(["keys", "add", "a", "--file", str(tmp_path / "bad.yaml")]) == 2
    assert "line 3: tenants.a.priority" in capsys.readouterr().err
