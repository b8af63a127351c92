#!/usr/bin/env bash
# Installs everything (ci/install.sh), then runs the test suites: the torch suite and the MindSpore
# suite, side by side in processes of their own (mindnlp takes over `import torch` process-wide).
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh || exit 1
export GLOG_v=3 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Lint, format and types first: seconds, and a red line before half an hour of tests.
echo "ci: ruff check, ruff format --check, mypy"
.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy || exit 1
reports=$(mktemp -d)
# The docs: strict, so a broken link or anchor, or a page missing from mkdocs.yml's nav, fails CI.
echo "ci: mkdocs build --strict"
.venv/bin/mkdocs build --strict --site-dir "$reports/site" || exit 1
status=0
# The two suites side by side, each in its own process (mindnlp takes over `import torch`) and
# its own temporary folder: much of a test's time is one thread launching small ops (measured on
# 2 cores: 42 minutes side by side against about 49 one after the other). One compute thread per
# suite (OMP_NUM_THREADS, which both backends read) unless set: with two each, half the CPU time
# went to the kernel (top: 50 % sy). A line per test (-v: dots would wait for a full line),
# prefixed with its suite.
suite() {
    local name=$1; shift
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest "$@" -v -p no:cacheprovider --basetemp "$reports/$name-tmp" \
        --junitxml "$reports/$name.xml" 2>&1 | sed -u "s/^/[$name] /"
    return "${PIPESTATUS[0]}"
}
suite torch tests --ignore=tests/mindspore "$@" &
torch_suite=$!
suite mindspore tests/mindspore "$@" &
mindspore_suite=$!
wait "$torch_suite" || status=1
wait "$mindspore_suite" || status=1
.venv/bin/python - "$reports" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    suite = ET.parse(f).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    for k in total:
        total[k] += int(suite.get(k, 0))
failed = total["failures"] + total["errors"]
print(f"all suites: {total['tests'] - failed - total['skipped']} passed, {failed} failed, {total['skipped']} skipped")
PY
exit $status
