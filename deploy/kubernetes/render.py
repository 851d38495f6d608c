#!/usr/bin/env python3
"""Renders deploy/kubernetes the way `kubectl apply -k` would, without a cluster or kustomize.

Usage: render.py [OUT]   writes the multi-document YAML to OUT (default: stdout).

It knows only the kustomization fields this folder uses and refuses any other, so it cannot
silently render something kustomize would not. When kubectl is installed, its own `kustomize`
renders the folder too and both must agree object for object.
"""
import base64
import os
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = {"apiVersion", "kind", "resources", "generatorOptions", "configMapGenerator", "secretGenerator"}


def fail(msg):
    sys.exit(f"render.py: {msg}")


def read(name):
    path = os.path.join(HERE, name)
    if not os.path.isfile(path):
        fail(f"kustomization names {name}, which does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read()


def generated(kind, gen, hashed):
    if hashed:
        fail("name-suffix hashes are on: this renderer (and the hot-reload story) expects them off")
    unknown = set(gen) - {"name", "files", "type"}
    if unknown:
        fail(f"{kind} generator field(s) {sorted(unknown)} not supported")
    files = {os.path.basename(f): read(f) for f in gen["files"]}
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in files.items()}
    else:
        obj["data"] = files
    return obj


def render():
    k = yaml.safe_load(read("kustomization.yaml"))
    unknown = set(k) - KNOWN
    if unknown:
        fail(f"kustomization field(s) {sorted(unknown)} not supported")
    hashed = not k.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    objs = []
    for r in k.get("resources", []):
        objs += [d for d in yaml.safe_load_all(read(r)) if d]
    objs += [generated("ConfigMap", g, hashed) for g in k.get("configMapGenerator", [])]
    objs += [generated("Secret", g, hashed) for g in k.get("secretGenerator", [])]
    # Every volume the Deployment mounts must come from an object rendered here.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for o in objs:
        if o["kind"] != "Deployment":
            continue
        for v in o["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                fail(f"volume {v['name']} names a ConfigMap that is not rendered")
            if "secret" in v and ("Secret", v["secret"]["secretName"]) not in names:
                fail(f"volume {v['name']} names a Secret that is not rendered")
    return objs


def by_name(objs):
    out = {}
    for o in objs:
        if o["kind"] == "Secret":
            # kustomize wraps base64 at 70 columns: compare the bytes, not the wrapping.
            o = dict(o, data={k: base64.b64decode("".join(v.split())) for k, v in o.get("data", {}).items()})
        out[(o["kind"], o["metadata"]["name"])] = o
    return out


def main():
    objs = render()
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", HERE], check=True, capture_output=True, text=True, timeout=60)
        real = by_name(d for d in yaml.safe_load_all(out.stdout) if d)
        if real != by_name(objs):
            fail("kubectl kustomize renders something else than this script; update one of them")
        print("render.py: matches kubectl kustomize", file=sys.stderr)
    text = yaml.safe_dump_all(objs, sort_keys=False)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
