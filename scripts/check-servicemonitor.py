#!/usr/bin/env python3
"""Checks deploy/kubernetes/servicemonitor.yaml, which kubernetes-validate skips (a CRD):
the fields the Prometheus Operator's ServiceMonitor v1 schema allows where the manifest
uses them, durations in its format, and that the selector and port match exactly one
Service of service.yaml. Usage: scripts/check-servicemonitor.py DIR"""
import re
import sys

import yaml

DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
UNITS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
SPEC_KEYS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
             "sampleLimit", "targetLimit", "labelLimit", "attachMetadata", "scrapeProtocols"}
ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
                 "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps", "basicAuth", "oauth2",
                 "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2", "filterRunning"}


def seconds(d):
    return sum(int(n) * UNITS[u] for n, u in re.findall(r"([0-9]+)(ms|y|w|d|h|m|s)", d))


def fail(msg):
    sys.exit(f"servicemonitor.yaml: {msg}")


def main(directory):
    with open(f"{directory}/servicemonitor.yaml") as f:
        sm = yaml.safe_load(f)
    with open(f"{directory}/service.yaml") as f:
        services = [s for s in yaml.safe_load_all(f) if s and s.get("kind") == "Service"]
    if sm.get("apiVersion") != "monitoring.coreos.com/v1" or sm.get("kind") != "ServiceMonitor":
        fail("not a monitoring.coreos.com/v1 ServiceMonitor")
    if not sm.get("metadata", {}).get("name"):
        fail("metadata.name missing")
    spec = sm.get("spec") or {}
    if set(spec) - SPEC_KEYS:
        fail(f"unknown spec fields {sorted(set(spec) - SPEC_KEYS)}")
    want = (spec.get("selector") or {}).get("matchLabels") or {}
    if not want:
        fail("spec.selector.matchLabels missing")
    chosen = [s for s in services if want.items() <= (s["metadata"].get("labels") or {}).items()]
    if len(chosen) != 1:
        fail(f"selector {want} matches {len(chosen)} Services, not exactly one")
    ports = {p.get("name") for p in chosen[0]["spec"]["ports"]}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        fail("spec.endpoints missing")
    for i, e in enumerate(endpoints):
        if set(e) - ENDPOINT_KEYS:
            fail(f"endpoints[{i}]: unknown fields {sorted(set(e) - ENDPOINT_KEYS)}")
        if e.get("port") not in ports:
            fail(f"endpoints[{i}].port {e.get('port')!r} is not a port of Service {chosen[0]['metadata']['name']}")
        for key in ("interval", "scrapeTimeout"):
            if key in e and not DURATION.match(str(e[key])):
                fail(f"endpoints[{i}].{key}: invalid duration {e[key]!r}")
        if "interval" in e and "scrapeTimeout" in e and seconds(e["scrapeTimeout"]) > seconds(e["interval"]):
            fail(f"endpoints[{i}]: scrapeTimeout longer than interval")
    print(f"{directory}/servicemonitor.yaml: ServiceMonitor/{sm['metadata']['name']} OK "
          f"(Service {chosen[0]['metadata']['name']}, port {endpoints[0]['port']})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes")
