#!/usr/bin/env python3
"""Writes the `exp_annotations` of the alert rule tests from what promtool renders.

    scripts/alert-test-annotations.py alerts/tests/locks-indexes.yml   # fill missing ones
    scripts/alert-test-annotations.py --refresh alerts/tests/*.yml      # rewrite them all

A test case names the labels it expects (`- exp_labels: {...}`, one line). For each one not
followed by `exp_annotations`, this runs that test group alone with promtool and inserts the
summary, description and runbook promtool rendered for the alert with exactly those labels.
Use it after editing an annotation text in alerts/pgvigil.rules.yml, then read the diff: the
rendered text (labels, values) is what the test pins. It never changes labels or times, so a
test whose alerts do not fire still fails."""
import json, re, subprocess, sys, os, tempfile

LBL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

def parse_labels(s):
    return {k: json.loads('"' + v + '"') for k, v in LBL.findall(s)}

def run(header, group, d):
    with tempfile.NamedTemporaryFile('w', suffix='.yml', dir=d, delete=False) as f:
        f.write(header + 'tests:\n' + group)
        name = f.name
    try:
        out = subprocess.run(['promtool', 'test', 'rules', name], capture_output=True, text=True)
    finally:
        os.unlink(name)
    text = out.stdout + out.stderr
    got = {}  # (alertname, time) -> list of (labels, annotations)
    cur = None
    mode = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        l = lines[i].strip()
        m = re.match(r'alertname: (\w+), time: ([^,]+),', l)
        if m:
            cur = (m.group(1), m.group(2)); got.setdefault(cur, []); mode = None
        elif l.startswith('exp:['):
            mode = 'exp'
        elif l.startswith('got:['):
            mode = 'got'
        elif l.startswith('Labels:{') and mode == 'got':
            labels = parse_labels(l[len('Labels:'):])
            ann = parse_labels(lines[i + 1].strip()[len('Annotations:'):])
            got[cur].append((labels, ann)); i += 1
        i += 1
    return got, text

def norm_time(t):
    # promtool prints durations like 5m, 1h10m, 1d2h
    units = {'d': 86400, 'h': 3600, 'm': 60, 's': 1}
    return sum(int(n) * units[u] for n, u in re.findall(r'(\d+)([dhms])', t))

def yq(v):
    return json.dumps(v, ensure_ascii=False)

def main(path):
    src = open(path).read()
    head, _, body = src.partition('\ntests:\n')
    header = head + '\n'
    # split groups at lines "  - interval:" keeping preceding comment lines with the group
    lines = body.splitlines(keepends=True)
    starts = [i for i, l in enumerate(lines) if l.startswith('  - ')]
    # move leading comment lines into the group
    groups = []
    bounds = []
    for k, s in enumerate(starts):
        b = s
        while b > 0 and lines[b - 1].startswith('  #'):
            b -= 1
        bounds.append(b)
    bounds.append(len(lines))
    pre = ''.join(lines[:bounds[0]])
    out = [pre]
    for k in range(len(starts)):
        g = lines[bounds[k]:bounds[k + 1]]
        gtext = ''.join(g)
        if 'exp_labels' in gtext:
            got, text = run(header, gtext, os.path.dirname(os.path.abspath(path)))
            new = []
            alert = t = None
            for j, l in enumerate(g):
                new.append(l)
                m = re.match(r'\s*- eval_time: (\S+)', l)
                if m: t = m.group(1)
                m = re.match(r'\s*alertname: (\S+)', l)
                if m: alert = m.group(1)
                m = re.match(r'(\s*)- exp_labels: (\{.*\})\s*$', l)
                if m and not (j + 1 < len(g) and 'exp_annotations' in g[j + 1]):
                    ind = m.group(1)
                    want = {}
                    for part in re.findall(r'(\w+): ("[^"]*"|[^,}]+)', m.group(2)):
                        want[part[0]] = part[1].strip().strip('"')
                    want['alertname'] = alert
                    cands = [a for (key, lst) in got.items() if key[0] == alert for (lb, a) in lst if lb == want]
                    # prefer matching time
                    cands_t = [a for (key, lst) in got.items() if key[0] == alert and norm_time(key[1]) == norm_time(t) for (lb, a) in lst if lb == want]
                    cands = cands_t or cands
                    if not cands:
                        sys.stderr.write(f'{path}: no rendering for {alert} at {t} {want}\n{text}\n')
                        continue
                    ann = cands[0]
                    new.append(f'{ind}  exp_annotations:\n')
                    for key in sorted(ann):
                        new.append(f'{ind}    {key}: {yq(ann[key])}\n')
            g = new
        out.append(''.join(g))
    open(path, 'w').write(head + '\ntests:\n' + ''.join(out))

def strip(path):
    out, skip = [], None
    for l in open(path).read().splitlines(keepends=True):
        ind = len(l) - len(l.lstrip())
        if skip is not None:
            if l.strip() and ind > skip:
                continue
            skip = None
        if l.strip() == 'exp_annotations:':
            skip = ind
            continue
        out.append(l)
    open(path, 'w').write(''.join(out))

args = sys.argv[1:]
refresh = '--refresh' in args
for p in [a for a in args if a != '--refresh']:
    if refresh:
        strip(p)
    main(p)
