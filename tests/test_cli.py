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
from app.config import ConfigError

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


def test_cli_serve_certificate_settings_are_checked_together(tmp_path, capsys):
    code = main(["serve", "--cert-dir", str(tmp_path), "--namespaces", NAMESPACES,
                 "--manage-certs", "--cert-secret", "poolkeeper-tls", "--service", "Pool_Keeper",
                 "--webhook-configuration", "Bad Name", "--cert-overlap", "0",
                 "--metrics-port", "8443"])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("cert-secret: 'poolkeeper-tls' is not NAMESPACE/NAME",
                     "service: 'Pool_Keeper' is not a valid Service name",
                     "webhook-configuration: 'Bad Name' is not a valid object name",
                     "cert-overlap: 0.0 must be > 0 seconds",
                     "metrics-port: 8443 is the webhook port too"):
        assert fragment in err


def test_cli_serve_manage_certs_without_an_api_server_exits_with_the_reason(tmp_path):
    from .server import free_port

    result = run("serve", "--manage-certs", "--kubeconfig", str(tmp_path / "missing"),
                 "--cert-dir", str(tmp_path / "tls"), "--namespaces", NAMESPACES,
                 "--host", "127.0.0.1", "--port", str(free_port()),
                 "--metrics-port", str(free_port()))
    assert result.returncode == 1
    assert "poolkeeper cannot start: --manage-certs: kubeconfig not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_certificate_settings_have_the_documented_defaults_and_read_the_environment():
    from app.config import load_settings

    defaults = load_settings({}, {})
    assert (defaults.manage_certs, defaults.cert_secret, defaults.service,
            defaults.webhook_configuration, defaults.metrics_port) == (
        False, "poolkeeper-system/poolkeeper-tls", "poolkeeper", "poolkeeper", 9090)
    assert (defaults.secret_namespace, defaults.secret_name) == ("poolkeeper-system",
                                                                 "poolkeeper-tls")
    env = load_settings({}, {"POOLKEEPER_MANAGE_CERTS": "true",
                             "POOLKEEPER_CERT_SECRET": "pk/pk-tls"})
    assert env.manage_certs is True and env.secret_namespace == "pk"
    assert load_settings({}, {"POOLKEEPER_MANAGE_CERTS": "false"}).manage_certs is False
    with pytest.raises(ConfigError, match="POOLKEEPER_MANAGE_CERTS: 'maybe' is not a valid bool"):
        load_settings({}, {"POOLKEEPER_MANAGE_CERTS": "maybe"})


def test_default_workers_are_one_per_usable_core_and_at_least_two(monkeypatch):
    """A review is CPU-bound: the default no longer runs 2 x cores + 1 processes, which only
    time-slice the cores (five on two cores tripled the served p99, bench/README.md)."""
    import os

    from app.config import load_settings

    for cores, expected in (({0}, 2), ({0, 1}, 2), (set(range(8)), 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cores=cores: cores)
        assert load_settings({}, {}).resolved_workers() == expected
    assert load_settings({}, {"POOLKEEPER_WORKERS": "5"}).resolved_workers() == 5
    # where the OS has no CPU affinity (macOS, for `make run`), the cores it reports
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert load_settings({}, {}).resolved_workers() == 6


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
    total = len([p for p in (cases / "image-pull-policy").iterdir() if p.is_dir()])
    assert result.stdout.splitlines()[-1] == f"{total - 1} passed, 1 failed"


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


# -- mutate takes what a user has ------------------------------------------------------------------

def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def controller_case(kind_slug: str, outcome: str) -> dict:
    rule = "agentpool-node-selector"
    return yaml.safe_load((TESTDATA / f"rules/{rule}/{kind_slug}-template-{outcome}/input.yaml")
                          .read_text())


@pytest.mark.parametrize("slug", ["deployment", "replicaset", "statefulset", "daemonset",
                                  "replicationcontroller", "job", "cronjob"])
def test_cli_mutate_denies_every_controller_kind_whose_template_asks_for_another_pool(
        tmp_path, capsys, slug):
    path = write(tmp_path, "obj.yaml", yaml.safe_dump(controller_case(slug, "with-other-pool-is-denied")))
    assert main(["mutate", "--namespaces", NAMESPACES, path]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "pod template spec." in err and '"pool2"' in err


def test_cli_mutate_a_list_keeps_its_shape_and_names_each_denial(tmp_path, capsys):
    good = controller_case("deployment", "without-pool-is-left-unchanged")
    bad = controller_case("statefulset", "with-other-pool-is-denied")
    pod = yaml.safe_load((TESTDATA / "pods/plain-pod.yaml").read_text())
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
               "items": [good, bad, pod]}
    path = write(tmp_path, "list.yaml", yaml.safe_dump(listing))
    assert main(["mutate", "--namespaces", NAMESPACES, path]) == 1
    out, err = capsys.readouterr()
    result = yaml.safe_load(out)
    assert result["kind"] == "List" and len(result["items"]) == 3
    assert result["items"][0] == good and result["items"][1] == bad  # templates never patched
    assert result["items"][2]["spec"]["nodeSelector"] == {"agentpool": "pool1"}
    assert 'denied: StatefulSet "team-payments/web": [agentpool-node-selector]' in err
    assert 'Warning: Deployment "team-payments/web": [remove-cpu-limits] pods of this ' \
           "Deployment will get: remove cpu limits from 1 container" in err


def test_cli_mutate_a_multi_document_stream_keeps_its_shape(tmp_path, capsys):
    pod = (TESTDATA / "pods/plain-pod.yaml").read_text()
    daemonset = (TESTDATA / "pods/daemonset.yaml").read_text()
    path = write(tmp_path, "stream.yaml", pod + "\n---\n" + daemonset)
    assert main(["mutate", "--namespaces", NAMESPACES, path]) == 0
    first, second = yaml.safe_load_all(capsys.readouterr().out)
    assert first["spec"]["nodeSelector"] == {"agentpool": "pool1"}
    assert second["spec"]["template"]["spec"]["nodeSelector"] == {"agentpool": "pool2"}


def test_cli_mutate_keeps_what_kubectl_get_prints(tmp_path, capsys):
    pod = yaml.safe_load((TESTDATA / "pods/plain-pod.yaml").read_text())
    pod["metadata"].update(resourceVersion="4711", uid="0d1e", managedFields=[
        {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {}}])
    pod["status"] = {"phase": "Pending"}
    path = write(tmp_path, "pod.yaml", yaml.safe_dump(pod))
    assert main(["mutate", "--namespaces", NAMESPACES, path]) == 0
    result = yaml.safe_load(capsys.readouterr().out)
    assert result["status"] == {"phase": "Pending"}
    assert result["metadata"]["resourceVersion"] == "4711" and result["metadata"]["managedFields"]
    assert result["spec"]["nodeSelector"] == {"agentpool": "pool1"}


def test_cli_mutate_says_when_no_rule_acts_on_a_kind(tmp_path, capsys):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}
    assert main(["mutate", "--namespaces", NAMESPACES, write(tmp_path, "cm.yaml",
                                                             yaml.safe_dump(cm))]) == 0
    assert 'no rule acts on ConfigMap ("v1"): printed unchanged' in capsys.readouterr().err


def test_cli_mutate_warns_about_a_namespace_missing_from_the_file(tmp_path, capsys):
    pod = yaml.safe_load((TESTDATA / "pods/plain-pod.yaml").read_text())
    pod["metadata"]["namespace"] = "team-nowhere"
    assert main(["mutate", "--namespaces", NAMESPACES, write(tmp_path, "p.yaml",
                                                             yaml.safe_dump(pod))]) == 0
    out, err = capsys.readouterr()
    assert f'Warning: namespace "team-nowhere" is not in {NAMESPACES}: treated as unlabelled' \
        in err
    assert "nodeSelector" not in yaml.safe_load(out)["spec"]


@pytest.mark.parametrize("target, fragment", [
    ("/nonexistent.yaml", "cannot read /nonexistent.yaml: No such file or directory"),
    ("DIR", "is a directory: give a file"),
])
def test_cli_mutate_unreadable_input_is_one_line_exit_2(tmp_path, capsys, target, fragment):
    target = str(tmp_path) if target == "DIR" else target
    assert main(["mutate", "--namespaces", NAMESPACES, target]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Errno" not in err and len(err.strip().splitlines()) == 1


def test_cli_mutate_without_a_cluster_suggests_a_namespaces_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["mutate", str(TESTDATA / "pods/plain-pod.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes API access" in err and "--namespaces FILE" in err


def test_cli_serve_on_a_taken_port_says_so_and_how_to_pick_another(tmp_path, capsys):
    import socket

    from app.certs import create_certificates

    create_certificates(tmp_path, "poolkeeper", "poolkeeper-system")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--cert-dir",
                     str(tmp_path), "--namespaces", NAMESPACES])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert "make run PORT=N" in err and "Traceback" not in err


# -- for the person at the terminal ----------------------------------------------------------------

def test_cli_version_flag_and_command():
    flag = run("--version")
    assert flag.returncode == 0 and flag.stdout.startswith("poolkeeper ") and "Python" in flag.stdout
    data = json.loads(run("version", "-o", "json").stdout)
    assert data["poolkeeper"] and data["python"] and data["dependencies"]["gunicorn"]
    assert len(data["rules"]["digest"]) == 64 and "agentpool-node-selector" in data["rules"]["names"]


def test_cli_help_names_defaults_and_environment_of_every_setting():
    from dataclasses import fields

    from app.config import Settings

    text = " ".join(run("serve", "--help").stdout.split())
    for field in fields(Settings):
        assert f"POOLKEEPER_{field.name.upper()}" in text, field.name
    assert "(default: 8443; environment: POOLKEEPER_PORT)" in text
    certs = " ".join(run("certs", "--help").stdout.split())
    assert "(default: 365)" in certs and "renewal window" in certs


def test_cli_bash_completion_loads_and_completes(tmp_path):
    script = run("completion", "bash").stdout
    path = tmp_path / "poolkeeper.bash"
    path.write_text(script)
    probe = (f"source {path}; COMP_WORDS=(poolkeeper te); COMP_CWORD=1; _poolkeeper; "
             'echo "${COMPREPLY[@]}"; COMP_WORDS=(poolkeeper mutate -o ""); COMP_CWORD=3; '
             '_poolkeeper; echo "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    first, second = result.stdout.splitlines()
    assert first == "test" and second.split() == ["yaml", "json", "review", "object"]


@pytest.mark.parametrize("shell, checker", [("zsh", ["zsh", "-n"]), ("fish", ["fish", "-n"])])
def test_cli_other_completion_scripts_are_valid(tmp_path, shell, checker):
    script = run("completion", shell).stdout
    assert "poolkeeper" in script and "serve" in script
    if shutil.which(checker[0]) is None:
        pytest.skip(f"{checker[0]} is not installed: its script was only generated")
    path = tmp_path / f"poolkeeper.{shell}"
    path.write_text(script)
    assert subprocess.run([*checker, str(path)], capture_output=True, timeout=30).returncode == 0


def test_cli_test_takes_a_rule_directory_one_case_and_a_rule_filter(tmp_path):
    rule_dir = TESTDATA / "rules/remove-cpu-limits"
    one = run("test", str(rule_dir))
    assert one.returncode == 0 and all(line.startswith(("PASS remove-cpu-limits/", "7 passed"))
                                       or "passed" in line for line in one.stdout.splitlines())
    case = run("test", str(rule_dir / "pod-without-cpu-limits-is-left-alone"))
    assert case.stdout.splitlines() == ["PASS remove-cpu-limits/pod-without-cpu-limits-is-left-alone",
                                        "1 passed, 0 failed"]
    filtered = run("test", "--rule", "image-pull-policy", "-o", "json")
    data = json.loads(filtered.stdout)
    assert {c["rule"] for c in data["cases"]} == {"image-pull-policy"} and data["failed"] == 0
    nothing = run("test", "--rule", "no-such-rule")
    assert nothing.returncode == 1 and "no cases of rule no-such-rule" in nothing.stderr


def test_cli_test_finds_its_cases_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "app", "test", "-o", "yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["failed"] == 0


def test_cli_test_writes_junit_xml(tmp_path):
    from xml.etree import ElementTree

    cases = tmp_path / "cases"
    shutil.copytree(TESTDATA / "rules/image-pull-policy", cases / "image-pull-policy")
    expected = cases / "image-pull-policy/platform-pod-pulls-always/expected.yaml"
    expected.write_text(expected.read_text().replace("Always", "Never"))
    report = tmp_path / "junit.xml"
    assert run("test", str(cases), "--junit", str(report)).returncode == 1
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    failed = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [
        ("image-pull-policy", "platform-pod-pulls-always")]
