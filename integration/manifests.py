"""Owns rendering deploy/ for a cluster: kustomize the base or an overlay, then set the caBundle.

    python integration/manifests.py [DIR] [--ca-file ca.crt ...]  > poolkeeper.yaml

prints the objects of ``kubectl kustomize DIR`` (default ``deploy``) with every webhook's
``clientConfig.caBundle`` set to the given CA certificates (several during a rotation, so the API
server trusts the old and the new serving certificate). ``--certificates`` prints ``managed``
when the rendered Deployment manages its own certificates (POOLKEEPER_MANAGE_CERTS, the base),
else ``external`` (deploy/components/external-certs). integration/deploy.sh and the apiserver
tier (tests/test_apiserver_tier.py) render through here, so both apply the same objects.
"""

from __future__ import annotations

import argparse
import base64
import copy
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
# Applied after the workload is ready: a webhook configuration before its server fails closed,
# and the policy without the webhook denies every pod that does not pin itself.
ADMISSION_KINDS = (*WEBHOOK_KINDS, "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
KUSTOMIZE_TIMEOUT = 60  # seconds; rendering takes well under one


class RenderError(RuntimeError):
    """deploy/ could not be rendered; the message says why."""


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: str | Path = DEPLOY) -> list[dict]:
    """The objects ``kubectl kustomize DIRECTORY`` prints, in order."""
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl not found on PATH: it renders deploy/ (kubectl kustomize)")
    result = subprocess.run([binary, "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=KUSTOMIZE_TIMEOUT)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def listed_files(directory: str | Path = DEPLOY) -> list[dict]:
    """Without kubectl: the objects of the plain files a kustomization lists under ``resources``,
    following listed kustomization directories (``kustomization.yaml`` only), but none of their
    generators, patches or transformers."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
        elif (path / "kustomization.yaml").is_file():
            objects.extend(listed_files(path))
    return objects


def ca_bundle(*pem_files: str | Path) -> str:
    """base64 of the CA certificates, concatenated: one webhook caBundle trusting each of them."""
    pems = [Path(p).read_bytes() for p in pem_files]
    if not pems:
        raise RenderError("no CA certificate given for the caBundle")
    return base64.b64encode(b"".join(p if p.endswith(b"\n") else p + b"\n"
                                     for p in pems)).decode()


def with_ca_bundle(objects: Iterable[dict], bundle: str) -> list[dict]:
    """Copies of the objects, each webhook's clientConfig carrying ``bundle``."""
    result = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        if obj.get("kind") in WEBHOOK_KINDS:
            for webhook in obj.get("webhooks", []):
                webhook.setdefault("clientConfig", {})["caBundle"] = bundle
        result.append(obj)
    return result


def with_image(objects: Iterable[dict], name: str, reference: str) -> list[dict]:
    """Copies of the objects, containers running image ``name`` (any tag) running
    ``reference`` instead, as `kustomize edit set image` would."""
    result = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            if container.get("image", "").rsplit("@", 1)[0].rsplit(":", 1)[0] == name:
                container["image"] = reference
        result.append(obj)
    return result


def part(objects: Iterable[dict], which: str) -> list[dict]:
    """``admission``: the webhook configuration and policies; ``webhooks``: only the webhook
    configurations; ``workload``: everything else."""
    if which == "webhooks":
        return [o for o in objects if o.get("kind") in WEBHOOK_KINDS]
    admission = which == "admission"
    return [o for o in objects if (o.get("kind") in ADMISSION_KINDS) == admission]


def manages_certificates(objects: Iterable[dict]) -> bool:
    """Whether the Deployment runs poolkeeper with POOLKEEPER_MANAGE_CERTS=true."""
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"].get("containers", []):
            for env in container.get("env", []):
                if env.get("name") == "POOLKEEPER_MANAGE_CERTS":
                    return str(env.get("value", "")).lower() == "true"
    return False


def dump(objects: Iterable[dict]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False, explicit_start=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render deploy/ (or an overlay) with the "
                                                 "webhooks' caBundle set.")
    parser.add_argument("directory", nargs="?", default=str(DEPLOY),
                        help="a kustomization directory (default: deploy)")
    parser.add_argument("--ca-file", action="append", default=[], metavar="PEM",
                        help="CA certificate the API server should trust; repeat during a "
                             "rotation (old and new)")
    parser.add_argument("--image", metavar="NAME=REFERENCE",
                        help="run REFERENCE where the manifests name image NAME")
    parser.add_argument("--part", choices=("all", "workload", "admission", "webhooks"),
                        default="all",
                        help="workload: all but the webhook configuration and policies, which "
                             "are applied once the workload is ready (admission); webhooks: "
                             "only the webhook configuration")
    parser.add_argument("--certificates", action="store_true",
                        help="print managed (poolkeeper manages its certificates) or external, "
                             "instead of the objects")
    args = parser.parse_args(argv)
    try:
        objects = render(args.directory)
        if args.certificates:
            print("managed" if manages_certificates(objects) else "external")
            return 0
        if args.ca_file:
            objects = with_ca_bundle(objects, ca_bundle(*args.ca_file))
        if args.image:
            name, _, reference = args.image.partition("=")
            objects = with_image(objects, name, reference or name)
        if args.part != "all":
            objects = part(objects, args.part)
    except (RenderError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"manifests: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
