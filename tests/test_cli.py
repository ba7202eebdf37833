"""The poolkeeper command: mutate, certs and serve's start-up checks, run as a user would."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from app.cli import main

from .support import ROOT, TESTDATA

NAMESPACES = str(TESTDATA / "namespaces.yaml")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_cli_mutate_prints_the_mutated_pod():
    result = run("mutate", "--namespaces", NAMESPACES, "testdata/pods/os-selector-pod.yaml")
    assert result.returncode == 0, result.stderr
    obj = yaml.safe_load(result.stdout)
    assert obj["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", "agentpool": "pool1"}


def test_cli_mutate_denial_goes_to_stderr_and_exits_1(capsys):
    code = main(["mutate", "--namespaces", NAMESPACES, "testdata/pods/other-pool-pod.yaml"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("denied: [agentpool-node-selector]") and '"pool2"' in err


def test_cli_mutate_reads_an_admission_review_from_stdin():
    review = (TESTDATA / "reviews/pod-create-deployment.json").read_text()
    result = run("mutate", "--namespaces", NAMESPACES, "--output", "review", "-", stdin=review)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)["response"]
    ops = json.loads(base64.b64decode(answer["patch"]))
    assert {"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "pool1"}} in ops
    assert {"op": "remove", "path": "/spec/containers/0/resources/limits/cpu"} in ops


def rules_dir(tmp_path, **replacements):
    """A copy of the shipped rules with text replaced in the named files."""
    target = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", target)
    for name, (old, new) in replacements.items():
        path = target / f"{name}.yaml"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return str(target)


def test_cli_mutate_rules_option_changes_the_rules(tmp_path, capsys):
    rules = rules_dir(tmp_path, **{"agentpool-node-selector": (
        "nodeLabelKey: agentpool", "nodeLabelKey: kubernetes.azure.com/agentpool")})
    code = main(["mutate", "--namespaces", NAMESPACES, "--rules", rules,
                 str(TESTDATA / "pods/plain-pod.yaml")])
    obj = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert obj["spec"]["nodeSelector"] == {"kubernetes.azure.com/agentpool": "pool1"}


def test_cli_mutate_object_namespace_wins_over_the_option(capsys):
    code = main(["mutate", "--namespaces", NAMESPACES, "-n", "default",
                 str(TESTDATA / "pods/daemonset.yaml")])
    assert code == 0 and yaml.safe_load(capsys.readouterr().out)["spec"]["template"]["spec"][
        "nodeSelector"] == {"agentpool": "pool2"}


def test_cli_mutate_leaves_unhandled_kinds_alone(tmp_path, capsys):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(cm))
    assert main(["mutate", "--namespaces", NAMESPACES, str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == cm


@pytest.mark.parametrize("content, fragment", [
    ("- a\n- b\n", "Kubernetes object or an AdmissionReview"),
    ("kind: Pod\n", "no apiVersion and kind"),
    ("a: [\n", "while parsing"),
    ('{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request is missing"),
])
def test_cli_mutate_bad_input_exits_2_with_a_message(tmp_path, capsys, content, fragment):
    path = tmp_path / "input.yaml"
    path.write_text(content)
    assert main(["mutate", "--namespaces", NAMESPACES, str(path)]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_mutate_missing_input_file(capsys):
    assert main(["mutate", "--namespaces", NAMESPACES, "/nonexistent.yaml"]) == 2
    assert "No such file" in capsys.readouterr().err


def test_cli_config_errors_are_reported_together(tmp_path, capsys):
    code = main(["mutate", "--namespaces", "/nonexistent.yaml", "--rules", "/nonexistent-rules",
                 "x.yaml"])
    err = capsys.readouterr().err
    assert code == 2
    for part in ("/nonexistent.yaml", "/nonexistent-rules"):
        assert part in err


def test_cli_invalid_rules_fail_with_file_and_field(tmp_path, capsys):
    rules = rules_dir(tmp_path, **{"image-pull-policy": ("policy: Always", "policy: Sometimes")})
    code = main(["mutate", "--namespaces", NAMESPACES, "--rules", rules,
                 str(TESTDATA / "pods/plain-pod.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "image-pull-policy.yaml: params.policy: 'Sometimes' is not one of Always" in err


def test_cli_certs_writes_a_pair_and_prints_the_ca_bundle(tmp_path):
    result = run("certs", "--out", str(tmp_path), "--service", "pk", "--namespace", "pk-system")
    assert result.returncode == 0, result.stderr
    assert base64.b64decode(result.stdout.strip()) == (tmp_path / "ca.crt").read_bytes()
    assert "created" in result.stderr
    again = run("certs", "--out", str(tmp_path), "--service", "pk", "--namespace", "pk-system")
    assert again.stdout == result.stdout and "kept" in again.stderr


def test_cli_certs_bad_names_exit_2(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--service", "Not_A_Name"]) == 2
    assert "Not_A_Name" in capsys.readouterr().err


def test_cli_serve_without_certificates_says_how_to_make_them(tmp_path, capsys):
    assert main(["serve", "--cert-dir", str(tmp_path), "--namespaces", NAMESPACES]) == 2
    assert "poolkeeper certs --out" in capsys.readouterr().err


def test_cli_environment_configures_settings(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("POOLKEEPER_RULES_DIR", rules_dir(tmp_path, **{"agentpool-node-selector": (
        "nodeLabelKey: agentpool", "nodeLabelKey: example.com/pool")}))
    assert main(["mutate", "--namespaces", NAMESPACES, str(TESTDATA / "pods/plain-pod.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["nodeSelector"] == {
        "example.com/pool": "pool1"}


def test_cli_test_runs_the_golden_cases():
    result = run("test")
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    assert lines[-1].endswith(" passed, 0 failed") and int(lines[-1].split()[0]) >= 20
    assert "PASS agentpool-node-selector/pod-with-other-pool-is-denied" in lines


def test_cli_test_fails_on_a_wrong_expectation(tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(TESTDATA / "rules/image-pull-policy", cases / "image-pull-policy")
    expected = cases / "image-pull-policy/platform-pod-pulls-always/expected.yaml"
    expected.write_text(expected.read_text().replace("Always", "Never"))
    result = run("test", str(cases))
    assert result.returncode == 1
    assert "FAIL image-pull-policy/platform-pod-pulls-always: object differs" in result.stdout
    assert result.stdout.splitlines()[-1] == "2 passed, 1 failed"


def test_cli_test_with_no_cases_fails(tmp_path):
    result = run("test", str(tmp_path))
    assert result.returncode == 1 and result.stdout.strip() == "0 passed, 0 failed"
    assert "no cases" in result.stderr


def test_cli_test_with_a_missing_directory_fails_with_status_1(tmp_path):
    result = run("test", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and result.stdout == ""
    assert f"case directory {tmp_path / 'nowhere'} does not exist" in result.stderr


def test_cli_test_with_invalid_rules_fails_with_status_1(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: other\n")
    result = run("test", "--rules", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert "poolkeeper test: " in result.stderr and "broken.yaml" in result.stderr
