"""Checks k8s/ and the Dockerfile; run through scripts/check-k8s.sh.

1. Renders every overlay in k8s/overlays/ with `kubectl kustomize`.
2. Validates every rendered object against the Kubernetes JSON schemas,
   offline and strict (an unknown field fails), for the oldest Kubernetes the
   manifests support and the newest the validator knows.
3. Checks what the schemas cannot: each service's Deployment has the probes,
   resources and hardened securityContext, a Service, an HPA (the gateway's
   also on connections per pod), a PDB; only the gateway takes traffic from
   outside (NetworkPolicy); preStop + SHUTDOWN_DRAIN_SECS fit in
   terminationGracePeriodSeconds; every ConfigMap/Secret referenced exists
   (prod: the one external Secret excepted).
4. Every environment variable the Rust code reads (check_k8s_env.py) is set
   for each binary that reads it, and nothing is set that it does not read,
   except the allowlist below.
5. The Dockerfile builds and copies every binary of the workspace, and its
   final stage runs as a non-root USER on a slim or distroless base.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_k8s_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = os.environ.get("KUBECTL", "kubectl")
# The oldest Kubernetes the manifests support (the preStop sleep action is
# on by default from 1.30) and the newest the validator ships schemas for.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

# binary -> its port; each one is a Deployment of the same name.
SERVICES = {
    "gateway": 4000,
    "chat-svc": 4001,
    "presence-svc": 4002,
    "signaling-svc": 4003,
    "huddle-svc": 4004,
    "push-svc": 4005,
}
GATEWAY_CONNECTIONS_METRIC = "quckchat_gateway_connections"
# Secrets that an overlay may reference without rendering them: created out
# of band (k8s/README.md lists their keys).
EXTERNAL_SECRETS = {"prod": {"quckchat"}}
# Seconds of terminationGracePeriodSeconds beyond preStop + drain: at least
# this (the process exits after the drain) and at most this + 10 ("matched").
GRACE_MARGIN = 5

# Variables the code reads that the manifests deliberately do not set.
ENV_ALLOWLIST = {
    # Set by the container runtime to the pod name in every pod; read only as
    # the fallback of NODE_NAME, which every Deployment sets.
    "HOSTNAME": "set by Kubernetes in every container",
    # Read by the gateway only so Phoenix env files work unchanged; QuckChat
    # signs nothing with it.
    "SECRET_KEY_BASE": "accepted for drop-in env files, unused",
    # The all-in-one binary's embedded stores; Kubernetes runs the services.
    "DATA_DIR": "all-in-one only (quckchat), not deployed on Kubernetes",
    # The `quckchat conversation|token` CLI's server address (kubectl exec).
    "QUCKCHAT_ADDR": "CLI option of the quckchat binary, not a service setting",
}
# Binaries of the workspace that are no Deployment (they are in the image).
NOT_DEPLOYED = {
    "quckchat": "the all-in-one server and its CLI (kubectl exec ... quckchat conversation ...)",
    "bench": "the load generator: a Job or a workstation, not a service",
}

errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


# ---------------------------------------------------------------- rendering

def render(overlay: Path) -> list[dict]:
    proc = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"{overlay.relative_to(ROOT)}: kubectl kustomize failed:\n{proc.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate_schemas(where: str, docs: list[dict]) -> None:
    for version in K8S_VERSIONS:
        for d in docs:
            name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                fail(f"{where}: {name} is invalid for Kubernetes {version} at {path or '<root>'}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{where}: {name}: {e.message}")
            except kubernetes_validate.InvalidSchemaError as e:
                fail(f"{where}: {name}: {e.message}")


# ---------------------------------------------------------------- structure

def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e.get("values", [])) or (op == "NotIn" and val in e.get("values", [])) \
                or (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def env_value(container: dict, name: str, configmaps: dict[str, dict]) -> str | None:
    for e in container.get("env") or []:
        if e["name"] == name and "value" in e:
            return e["value"]
    for src in container.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref and ref["name"] in configmaps:
            data = configmaps[ref["name"]].get("data") or {}
            if name in data:
                return data[name]
    return None


def check_structure(where: str, overlay: str, docs: list[dict]) -> None:
    deployments = by_kind(docs, "Deployment")
    services = list(by_kind(docs, "Service").values())
    hpas = list(by_kind(docs, "HorizontalPodAutoscaler").values())
    pdbs = list(by_kind(docs, "PodDisruptionBudget").values())
    policies = list(by_kind(docs, "NetworkPolicy").values())
    configmaps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")

    for name in sorted(set(deployments) - set(SERVICES)):
        fail(f"{where}: Deployment {name} is no known service (SERVICES in {Path(__file__).name})")
    for name, port in SERVICES.items():
        dep = deployments.get(name)
        if not dep:
            fail(f"{where}: no Deployment {name}")
            continue
        here = f"{where}: Deployment {name}"
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels") or {}
        spec = pod["spec"]
        if "replicas" in dep["spec"]:
            fail(f"{here}: sets spec.replicas, which its HPA owns (apply would reset the scale)")
        if len(spec["containers"]) != 1:
            fail(f"{here}: expected one container")
        c = spec["containers"][0]
        if (c.get("command") or [""])[0] != f"/usr/local/bin/{name}":
            fail(f"{here}: command should be /usr/local/bin/{name}, is {c.get('command')}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        if ports.get("http") != port:
            fail(f"{here}: container port 'http' should be {port}, is {ports.get('http')}")
        if env_value(c, "PORT", configmaps) != str(port):
            fail(f"{here}: PORT should be {port}")
        for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") not in ("http", port):
                fail(f"{here}: {probe} should be GET {path} on the http port, is {c.get(probe)}")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    fail(f"{here}: resources.{part}.{r} missing")
        psc = spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            fail(f"{here}: runAsNonRoot is not true")
        if (sc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
            fail(f"{here}: runAsUser must be set and not 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{here}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{here}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []) or (sc.get("capabilities") or {}).get("add"):
            fail(f"{here}: capabilities must drop ALL and add none")
        if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{here}: seccompProfile is not RuntimeDefault")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        if "emptyDir" not in vols.get(mounts.get("/tmp", ""), {}):
            fail(f"{here}: /tmp should be a writable emptyDir (the root filesystem is read-only)")

        # Shutdown: preStop, then SIGTERM and the drain, inside the grace period.
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        drain = env_value(c, "SHUTDOWN_DRAIN_SECS", configmaps)
        if drain is None or not drain.isdigit():
            fail(f"{here}: SHUTDOWN_DRAIN_SECS must be set (its grace period is matched to it)")
        else:
            need = pre + int(drain) + GRACE_MARGIN
            if not need <= grace <= need + 10:
                fail(f"{here}: terminationGracePeriodSeconds {grace} does not match preStop {pre}"
                     f" + SHUTDOWN_DRAIN_SECS {drain} + {GRACE_MARGIN} s margin (want {need}..{need + 10})")
        if name == "gateway" and not pre:
            fail(f"{here}: needs a preStop sleep so endpoints stop sending sockets before the drain")

        # The objects around it.
        if not any(selects({"matchLabels": s["spec"].get("selector") or {}}, labels) and s["spec"].get("selector")
                   and any(p.get("port") == port for p in s["spec"].get("ports", [])) for s in services):
            fail(f"{here}: no Service on port {port} selects its pods")
        if not any(selects(p["spec"].get("selector"), labels) for p in pdbs):
            fail(f"{here}: no PodDisruptionBudget selects its pods")
        mine = [h for h in hpas if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                and h["spec"]["scaleTargetRef"].get("name") == name]
        if len(mine) != 1:
            fail(f"{here}: expected one HorizontalPodAutoscaler, found {len(mine)}")
        else:
            metrics = mine[0]["spec"].get("metrics") or []
            if not any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
                fail(f"{here}: its HPA does not scale on CPU")
            if name == "gateway" and not any(
                    m.get("type") == "Pods" and m["pods"]["metric"]["name"] == GATEWAY_CONNECTIONS_METRIC
                    for m in metrics):
                fail(f"{here}: its HPA does not scale on {GATEWAY_CONNECTIONS_METRIC} per pod")

        # Who may connect: only the gateway from anywhere.
        ingress_policies = [p for p in policies if selects(p["spec"].get("podSelector"), labels)
                            and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])]
        if not ingress_policies:
            fail(f"{here}: no NetworkPolicy isolates its ingress")
        open_rule = False
        for p in ingress_policies:
            for rule in p["spec"].get("ingress") or []:
                peers = rule.get("from")
                if not peers or any("ipBlock" in peer or (peer.get("namespaceSelector") == {} and not peer.get("podSelector"))
                                    for peer in peers):
                    open_rule = True
        if name == "gateway" and not open_rule:
            fail(f"{here}: the gateway must take outside traffic (an ingress rule from anywhere)")
        if name != "gateway" and open_rule:
            fail(f"{here}: a NetworkPolicy lets traffic from outside the cluster in; only the gateway takes it")

        # References resolve.
        external = EXTERNAL_SECRETS.get(overlay, set())
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] not in external:
                s = secrets.get(ref["name"])
                if s is None:
                    fail(f"{here}: env {e['name']}: Secret {ref['name']} is not rendered")
                elif ref["key"] not in (s.get("data") or {}) and not ref.get("optional"):
                    fail(f"{here}: env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and ref["key"] not in (configmaps.get(ref["name"], {}).get("data") or {}) and not ref.get("optional"):
                fail(f"{here}: env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
        for src in c.get("envFrom") or []:
            if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                fail(f"{here}: envFrom ConfigMap {src['configMapRef']['name']} is not rendered")
            if "secretRef" in src:
                # Keys of an envFrom Secret cannot be checked against the code.
                fail(f"{here}: envFrom secretRef {src['secretRef']['name']}: reference each key (secretKeyRef)")


# ---------------------------------------------------------------- env vars

def container_env(c: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """Variable -> where it comes from."""
    out = {}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            for k in (configmaps.get(ref["name"], {}).get("data") or {}):
                out[k] = f"ConfigMap {ref['name']}"
    for e in c.get("env") or []:
        out[e["name"]] = "env"
    return out


def check_env(where: str, docs: list[dict], analysis: check_k8s_env.Analysis) -> None:
    deployments = by_kind(docs, "Deployment")
    configmaps = by_kind(docs, "ConfigMap")
    for name, dep in sorted(deployments.items()):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        binary = Path((c.get("command") or [""])[0]).name
        reads = analysis.binaries.get(binary)
        if reads is None:
            fail(f"{where}: Deployment {name} runs {binary!r}, which the workspace does not build")
            continue
        have = container_env(c, configmaps)
        for var in sorted(reads - set(have) - set(ENV_ALLOWLIST)):
            fail(f"{where}: Deployment {name}: {binary} reads {var}, which is set neither in its env"
                 f" nor in a ConfigMap it loads (empty means the default: set it empty)")
        for var in sorted(set(have) - reads):
            fail(f"{where}: Deployment {name}: {var} ({have[var]}) is not read by {binary}")


def check_env_coverage(analysis: check_k8s_env.Analysis) -> None:
    deployed = set().union(*(analysis.binaries.get(b, set()) for b in SERVICES))
    for var in sorted(analysis.read_anywhere - deployed - set(ENV_ALLOWLIST)):
        users = sorted(b for b, v in analysis.binaries.items() if var in v) or ["no binary the analysis can trace"]
        fail(f"env: {var} is read by {', '.join(users)} but by no deployed service: set it in k8s/"
             f" or add it to ENV_ALLOWLIST in scripts/check_k8s.py with a reason")
    for var in sorted(set(ENV_ALLOWLIST) - analysis.read_anywhere):
        fail(f"env: ENV_ALLOWLIST names {var}, which the code no longer reads: remove it")


# ---------------------------------------------------------------- Dockerfile

def workspace_binaries() -> dict[str, str]:
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    return {t["name"]: p["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}


def check_dockerfile(bins: dict[str, str]) -> None:
    path = ROOT / "Dockerfile"
    text = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages: list[list[str]] = []
    for ln in lines:
        if re.match(r"(?i)FROM\s", ln):
            stages.append([ln])
        elif stages:
            stages[-1].append(ln)
    if len(stages) < 2:
        fail("Dockerfile: expected a build stage and a final stage")
        return
    build = " ".join(ln for st in stages[:-1] for ln in st)
    final = stages[-1]
    builds = re.findall(r"cargo\s+build\b[^&;]*", build)
    if not builds:
        fail("Dockerfile: no `cargo build` in a build stage")
    if not any("--locked" in b for b in builds):
        fail("Dockerfile: `cargo build` should use --locked (the image builds Cargo.lock's versions)")
    workspace = any(re.search(r"--workspace\b|--all\b", b) and "--bins" in b for b in builds)
    for b, pkg in sorted(bins.items()):
        built = workspace or any(re.search(rf"(?:-p|--package)\s+{re.escape(pkg)}\b", x) or
                                 re.search(rf"--bin\s+{re.escape(b)}\b", x) for x in builds)
        if not built:
            fail(f"Dockerfile: binary {b} (package {pkg}) is not built (cargo build --workspace --bins, -p {pkg} or --bin {b})")
        if not re.search(rf"release/{re.escape(b)}(?![\w-])", build):
            fail(f"Dockerfile: binary {b} is not taken out of target/release/ in the build stage")
        copied = any(re.match(r"(?i)COPY\s", ln) and "--from" in ln and re.search(rf"/{re.escape(b)}(?![\w-])", ln)
                     for ln in final)
        if not copied:
            fail(f"Dockerfile: binary {b} is not copied into the final stage (COPY --from=... /{b} ...)")
    base = final[0].split()[1] if len(final[0].split()) > 1 else ""
    if not re.search(r"(^|/)distroless/|[:-]slim\b|^scratch$|^cgr\.dev/chainguard/", base):
        fail(f"Dockerfile: final stage base {base!r} is neither slim nor distroless")
    users = [ln.split(None, 1)[1].strip() for ln in final if re.match(r"(?i)USER\s", ln)]
    if not users:
        fail("Dockerfile: final stage has no USER (it would run as the base image's user)")
    elif re.fullmatch(r"(root|0)(:.*)?", users[-1]):
        fail(f"Dockerfile: final stage runs as {users[-1]!r}; it must be non-root")


# ---------------------------------------------------------------- main

def main() -> int:
    overlays = sorted(p for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    if {p.name for p in overlays} < {"dev", "prod"}:
        fail("k8s/overlays: expected at least dev and prod")
    analysis = check_k8s_env.analyse(ROOT)
    bins = workspace_binaries()
    for b in sorted(set(bins) - set(SERVICES) - set(NOT_DEPLOYED)):
        fail(f"workspace: binary {b} is neither a service (SERVICES) nor in NOT_DEPLOYED in scripts/check_k8s.py")
    for overlay in overlays:
        where = str(overlay.relative_to(ROOT))
        docs = render(overlay)
        if not docs:
            continue
        before = len(errors)
        validate_schemas(where, docs)
        check_structure(where, overlay.name, docs)
        check_env(where, docs, analysis)
        status = "ok" if len(errors) == before else f"{len(errors) - before} problem(s)"
        print(f"check-k8s: {where}: {len(docs)} objects rendered, validated for Kubernetes"
              f" {' and '.join(K8S_VERSIONS)} (strict): {status}")
    check_env_coverage(analysis)
    check_dockerfile(bins)
    if errors:
        for e in errors:
            print(f"check-k8s: FAIL: {e}", file=sys.stderr)
        print(f"check-k8s: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    print(f"check-k8s: env vars of {len(SERVICES)} services match the code; Dockerfile builds"
          f" {len(bins)} binaries ({', '.join(sorted(bins))}): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
