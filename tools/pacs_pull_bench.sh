#!/usr/bin/env bash
# Time from a PACS request to a ready session, against Debian's Orthanc: OHIF v2's DICOM-fetch session
# (`PUT /session/` with {"dicom": {...}}, DIMSE C-GET), then one click on it.
#
#   tools/pacs_pull_bench.sh SERIES_DIR [SERIES_DIR...]    # e.g. /tmp/dcm200/j2k_lossless /tmp/dcm200/explicit_le
#
# Series dirs hold .dcm files (tools/compare_dicom.py --out DIR --write-only writes two 200-slice ones).
# Needs target/release/deepgrow-server (cargo build --release), orthanc + orthanc-dicomweb, curl, python3.
# Prints, per series and round: the server's "fetched_ms" (C-GET retrieval) and "ready_ms" (retrieved and
# decoded), curl's total for the session create, and a first click on the session.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,10p "$0"; exit 2; }
ROUNDS=${ROUNDS:-3}
scratch=$(mktemp -d)
export ORTHANC_HTTP_PORT=${ORTHANC_HTTP_PORT:-18242} ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-14342}
PORT=${PORT:-15123}
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  tests/support/orthanc.sh stop "$scratch/orthanc" || true
  rm -rf "$scratch"
}
trap cleanup EXIT
tests/support/orthanc.sh start "$scratch/orthanc" >/dev/null
for dir in "$@"; do tests/support/orthanc.sh upload "$scratch/orthanc" "$dir"/*.dcm; done

target/release/deepgrow-server --port "$PORT" --pacs "127.0.0.1:$ORTHANC_DICOM_PORT" --pacs-timeout 300 \
  --log-format json >"$scratch/server.log" 2>&1 &
server_pid=$!
until curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; do sleep 0.1; done

orthanc="http://127.0.0.1:$ORTHANC_HTTP_PORT"
for series in $(curl -fs "$orthanc/series" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)))'); do
  read -r study_uid series_uid count < <(curl -fs "$orthanc/series/$series" | python3 -c '
import json, sys, urllib.request
s = json.load(sys.stdin)
study = json.load(urllib.request.urlopen(sys.argv[1] + "/studies/" + s["ParentStudy"]))
print(study["MainDicomTags"]["StudyInstanceUID"], s["MainDicomTags"]["SeriesInstanceUID"], len(s["Instances"]))' "$orthanc")
  body=$(printf '{"dicom": {"server_address": "127.0.0.1", "server_port": %s, "ae_title": "ORTHANC", "query_level": "SERIES", "patient_id": "", "study_uid": "%s", "series_uid": "%s"}}' \
    "$ORTHANC_DICOM_PORT" "$study_uid" "$series_uid")
  for round in $(seq 1 "$ROUNDS"); do
    reply=$(curl -s -w '\n%{time_total}' -X PUT -H 'Content-Type: application/json;charset=utf-8' \
      -d "$body" "http://127.0.0.1:$PORT/session/?expiry=600")
    total=$(tail -n1 <<<"$reply")
    id=$(head -n1 <<<"$reply" | python3 -c 'import json,sys; print(json.load(sys.stdin)["session_id"])')
    logged=$(grep '"series pulled by C-GET"' "$scratch/server.log" | tail -n1 | python3 -c '
import json, sys
f = json.loads(sys.stdin.read())["fields"]
print("fetched_ms=%s ready_ms=%s bytes=%s" % (f["fetched_ms"], f["ready_ms"], f["bytes"]))')
    k=$((count / 2))
    click=$(curl -s -o /dev/null -w '%{time_total}' \
      -F "params={\"foreground\":[[256,256,$k]],\"background\":[],\"result_extension\":\".nrrd\"}" \
      "http://127.0.0.1:$PORT/v1/deepgrow?model=deepgrow_2d&session_id=$id&output=image")
    curl -s -o /dev/null -X DELETE "http://127.0.0.1:$PORT/session/$id"
    echo "series $series_uid ($count instances) round $round: $logged session_create_s=$total first_click_s=$click"
  done
done
