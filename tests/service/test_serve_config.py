"""``ecgx serve --config``: a [serve] table under the flags, with precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_ecgx, snapshot

from ecgx.service.serve_config import ServeConfigError, resolve_serve_config


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def test_file_values_fill_in_and_flags_win(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[serve]\nrepo = "/srv/models"\nport = 6000\nmax_concurrent = 4\nallow_ungated = true\n'
        'trusted_keys = ["/etc/k.pem"]\ngrace_s = 3\n',
    )
    cfg = resolve_serve_config(path, {"port": 7000, "repo": None, "allow_ungated": None, "trusted_keys": ()})
    assert cfg.repo == Path("/srv/models") and cfg.port == 7000 and cfg.max_concurrent == 4
    assert cfg.allow_ungated is True and cfg.trusted_keys == (Path("/etc/k.pem"),) and cfg.grace_s == 3
    assert cfg.host == "127.0.0.1" and cfg.max_batch == 64  # defaults where neither says
    assert resolve_serve_config(None, {"repo": tmp_path}).repo == tmp_path


def test_security_and_monitoring_settings_come_from_the_file(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[serve]\nrepo = "r"\ntls_cert = "/etc/ecgx/s.crt"\ntls_key = "/etc/ecgx/s.key"\n'
        'tokens = "/etc/ecgx/access.toml"\nopen_health = true\naudit_log = "-"\n'
        "metrics_port = 9100\nstability_share = 0.2\nstability_queue = 8\n",
    )
    cfg = resolve_serve_config(path, {"metrics_port": None, "insecure": None})
    assert cfg.tls_cert == "/etc/ecgx/s.crt" and cfg.tls_key == "/etc/ecgx/s.key"
    assert cfg.tokens == Path("/etc/ecgx/access.toml") and cfg.open_health and cfg.audit_log == "-"
    assert cfg.metrics_port == 9100 and cfg.stability_share == 0.2 and cfg.stability_queue == 8
    assert cfg.insecure is False and cfg.metrics is True  # secure and monitored unless said otherwise


def test_audit_crl_and_metrics_tls_settings_come_from_the_file(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[serve]\nrepo = "r"\ntls_cert = "s.crt"\ntls_key = "s.key"\ntls_crl = "/etc/ecgx/clients.crl"\n'
        'audit_log = "a.jsonl"\naudit_required = true\n'
        'metrics_tls_cert = "serving"\nmetrics_tls_key = "m.key"\n',
    )
    cfg = resolve_serve_config(path, {"audit_required": None, "metrics_tls_cert": None})
    assert cfg.tls_crl == Path("/etc/ecgx/clients.crl") and cfg.audit_required
    assert cfg.metrics_tls() == ("s.crt", "m.key")
    assert resolve_serve_config(path, {"metrics_tls_cert": "c.pem"}).metrics_tls() == ("c.pem", "m.key")
    assert resolve_serve_config(None, {"repo": tmp_path}).metrics_tls() is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[serve]\nrepo = 'r'\nports = 1\n", "unknown key serve.ports"),
        ("[serve]\nrepo = 'r'\nport = '50051'\n", "serve.port must be int"),
        ("[serve]\nrepo = 'r'\nallow_ungated = 1\n", "serve.allow_ungated must be bool"),
        ("[serve]\nrepo = 'r'\nmax_concurrent = 0\n", "max_concurrent must be in [1, 1024], got 0"),
        ("[serve]\nrepo = 'r'\ngrace_s = nan\n", "grace_s must be in [0, 3600], got nan"),
        ("[serve]\nrepo = 'r'\ntrusted_keys = [1]\n", "serve.trusted_keys must be a list of strings"),
        ("[server]\nrepo = 'r'\n", "unknown table(s) ['server']"),
        ("[serve]\nport = 1\n", "give the model repository"),
        ("[serve\n", "is not valid TOML"),
        ("[serve]\nrepo = 'r'\ninsecure = 'yes'\n", "serve.insecure must be bool"),
        ("[serve]\nrepo = 'r'\nmetrics_port = 70000\n", "metrics_port must be in [0, 65535], got 70000"),
        ("[serve]\nrepo = 'r'\nstability_share = 1.5\n", "stability_share must be in [0, 1], got 1.5"),
        ("[serve]\nrepo = 'r'\nstability_queue = 0\n", "stability_queue must be in [1, 100000], got 0"),
        ("[serve]\nrepo = 'r'\ntls_cert = 3\n", "serve.tls_cert must be str"),
        ("[serve]\nrepo = 'r'\naudit_required = true\n", "audit_required needs an audit log"),
        ("[serve]\nrepo = 'r'\naudit_required = 'yes'\n", "serve.audit_required must be bool"),
        ("[serve]\nrepo = 'r'\nmetrics_tls_cert = 'm.crt'\n", "needs both --metrics-tls-cert and"),
        ("[serve]\nrepo = 'r'\nmetrics_tls_cert = 'serving'\nmetrics_tls_key = 'serving'\n", "as files"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ServeConfigError) as err:
        resolve_serve_config(_config(tmp_path, text), {})
    assert message in str(err.value) and "serve.toml" in str(err.value)


def test_ecgx_serve_with_a_bad_config_exits_2_before_listening(tmp_path: Path) -> None:
    path = _config(tmp_path, "[serve]\nrepo = 'r'\nmax_batch = -1\n")
    before = snapshot(tmp_path)
    result = run_ecgx("serve", "--config", str(path), "--port", "0")
    assert_clean_failure(result, "max_batch must be in [1, 4096], got -1", before=before, roots=[tmp_path])


def test_ecgx_serve_without_tls_or_insecure_refuses_to_start(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = run_ecgx("serve", "--repo", str(tmp_path), "--port", "0", "--metrics-port", "0")
    assert_clean_failure(result, "--insecure", before=before, roots=[tmp_path])
    assert "TLS" in result.stderr and "serving" not in result.stderr


def test_providers_come_from_the_file_or_the_flag_and_an_absent_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nrepo = "models"\nproviders = ["CPUExecutionProvider"]\n')
    assert resolve_serve_config(path, {}).providers == ("CPUExecutionProvider",)
    flags = {"providers": ("CUDAExecutionProvider", "CPUExecutionProvider")}
    assert resolve_serve_config(path, flags).providers == flags["providers"]
    before = snapshot(tmp_path)
    result = run_ecgx(
        "serve",
        "--repo",
        str(tmp_path),
        "--insecure",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--providers",
        "NoSuchExecutionProvider",
    )
    assert_clean_failure(
        result,
        "execution provider(s) ['NoSuchExecutionProvider'] are not available",
        before=before,
        roots=[tmp_path],
    )


def test_batching_defaults_on_and_the_file_sets_it_per_model(tmp_path: Path) -> None:
    from ecgx.service.batcher import BatchingQuotas

    default = resolve_serve_config(None, {"repo": tmp_path})
    assert (
        default.batching.for_model("ecg").enabled
        and default.batching.for_model("ecg").preferred_batch_size == 32
    )
    path = _config(
        tmp_path,
        "[serve]\nrepo = 'r'\n[batching]\npreferred_batch_size = 16\nmax_queue_delay_ms = 1\n"
        "[batching.models.ecg]\nenabled = false\n[batching.models.big]\npreferred_batch_size = 64\n",
    )
    cfg = resolve_serve_config(path, {})
    assert cfg.batching.for_model("other").preferred_batch_size == 16
    assert cfg.batching.for_model("other").max_queue_delay_ms == 1.0
    assert not cfg.batching.for_model("ecg").enabled  # its own table, the rest from [batching]
    assert cfg.batching.for_model("ecg").preferred_batch_size == 16
    assert cfg.batching.for_model("big").preferred_batch_size == 64 and cfg.batching.for_model("big").enabled
    quotas = cfg.quotas()  # the serving core reads the batching settings from its quotas
    assert isinstance(quotas, BatchingQuotas) and quotas.batching == cfg.batching


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[batching]\npreferred_batch_size = 0\n",
            "batching.preferred_batch_size must be in [1, 4096], got 0",
        ),
        (
            "[batching]\nmax_queue_delay_ms = 5000\n",
            "batching.max_queue_delay_ms must be in [0, 1000], got 5000",
        ),
        ("[batching]\nenabled = 1\n", "batching.enabled must be true or false"),
        ("[batching]\nmax_batch = 4\n", "unknown batching setting max_batch; known: enabled"),
        (
            "[batching.models.ecg]\npreferred_batch_size = 'x'\n",
            "batching.models.ecg.preferred_batch_size must",
        ),
        ("[batching]\nmodels = 3\n", "batching.models must hold one table per model"),
    ],
)
def test_bad_batching_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ServeConfigError) as err:
        resolve_serve_config(_config(tmp_path, "[serve]\nrepo = 'r'\n" + text), {})
    assert message in str(err.value) and "serve.toml" in str(err.value)


def test_engine_threads_default_to_one_and_zero_leaves_them_to_onnx_runtime(tmp_path: Path) -> None:
    assert resolve_serve_config(None, {"repo": tmp_path}).engine_threads_option() == {"threads": 1}
    path = _config(tmp_path, "[serve]\nrepo = 'r'\nengine_threads = 0\n")
    assert resolve_serve_config(path, {}).engine_threads_option() == {}
    path.write_text("[serve]\nrepo = 'r'\nengine_threads = 2\n")
    assert resolve_serve_config(path, {}).engine_threads_option() == {"threads": 2}
    path.write_text("[serve]\nrepo = 'r'\nengine_threads = -1\n")
    with pytest.raises(ServeConfigError, match=r"engine_threads must be in \[0, 256\], got -1"):
        resolve_serve_config(path, {})
