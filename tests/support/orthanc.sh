#!/usr/bin/env bash
# Start / stop a throw-away Orthanc (Debian packages `orthanc` + `orthanc-dicomweb`) for tests.
#
#   tests/support/orthanc.sh start  SCRATCH_DIR        # prints the Orthanc PID on stdout
#   tests/support/orthanc.sh stop   SCRATCH_DIR
#   tests/support/orthanc.sh status SCRATCH_DIR        # exit 0 and PID if running
#   tests/support/orthanc.sh upload SCRATCH_DIR FILE... # POST /instances, one file each
#   tests/support/orthanc.sh SCRATCH_DIR               # same as `start`
#
# Environment (defaults in brackets):
#   ORTHANC_HTTP_PORT [18042]   ORTHANC_DICOM_PORT [14242]   ORTHANC_AET [ORTHANC]
#   DEEPGROW_AET [DEEPGROW]     DEEPGROW_SCP_PORT [11113]    (C-MOVE destination, 127.0.0.1)
#   ORTHANC_BIN [Orthanc on PATH, else /usr/sbin/Orthanc]
#   ORTHANC_DICOMWEB_PLUGIN [from `dpkg -L orthanc-dicomweb`]
#   ORTHANC_EXTRA_PLUGINS [unset] more plugin .so paths, space-separated (e.g. the GDCM
#       plugin of `orthanc-gdcm`, /usr/share/orthanc/plugins/libOrthancGdcm.so, which lets
#       Orthanc decode/transcode JPEG 2000; without it Orthanc cannot)
#   ORTHANC_START_TIMEOUT [30] seconds to wait for `GET /system`
#   ORTHANC_EXTRA_CONFIG [unset] a JSON file copied next to the generated config; Orthanc
#       merges every *.json of the config directory, and refuses a key set in both files,
#       so it may only add options (e.g. "AcceptedTransferSyntaxes").
#
# Everything (config/, SQLite index, storage, log, pid file) lives in SCRATCH_DIR.
# `start` is idempotent: if the Orthanc recorded in SCRATCH_DIR/orthanc.pid is alive and
# answers on ORTHANC_HTTP_PORT, it prints that PID and does nothing else. It refuses to
# start when something else already answers on the HTTP port. All messages except the PID
# go to stderr, so `PID=$(tests/support/orthanc.sh start "$dir")` works.
# Running as root needs no flag (Orthanc has no root check; the Debian service merely
# runs it as user `orthanc`). Note: Orthanc 1.10 has no bind-address option; it listens on
# all interfaces, RemoteAccessAllowed=false only rejects non-loopback HTTP clients.
# Orthanc is detached (setsid) and outlives the caller: a harness or .ci/run should
# `trap 'tests/support/orthanc.sh stop "$dir"' EXIT`. `stop` uses the pid file only.
# Start-up takes ~0.2 s; a storage dir from an earlier run is reused (data kept).
set -euo pipefail

die() { echo "orthanc.sh: $*" >&2; exit 1; }
log() { echo "orthanc.sh: $*" >&2; }

cmd=start
case "${1:-}" in
  start|stop|status|upload) cmd=$1; shift ;;
  -h|--help|"") awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
[ $# -ge 1 ] || die "missing SCRATCH_DIR"
dir=$1; shift

HTTP_PORT=${ORTHANC_HTTP_PORT:-18042}
DICOM_PORT=${ORTHANC_DICOM_PORT:-14242}
AET=${ORTHANC_AET:-ORTHANC}
CLIENT_AET=${DEEPGROW_AET:-DEEPGROW}
CLIENT_PORT=${DEEPGROW_SCP_PORT:-11113}
TIMEOUT=${ORTHANC_START_TIMEOUT:-30}
URL="http://127.0.0.1:${HTTP_PORT}"
pidfile="$dir/orthanc.pid"

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
answers() { curl -fsS --max-time 2 "$URL/system" >/dev/null 2>&1; }
recorded_pid() { [ -f "$pidfile" ] && cat "$pidfile" || true; }

do_status() {
  local pid; pid=$(recorded_pid)
  if alive "$pid" && answers; then echo "$pid"; return 0; fi
  return 1
}

do_stop() {
  local pid; pid=$(recorded_pid)
  if alive "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then log "PID $pid ignored SIGTERM for 10 s, sending SIGKILL"; kill -KILL "$pid" || true; fi
  fi
  rm -f "$pidfile"
}

find_plugin() {
  if [ -n "${ORTHANC_DICOMWEB_PLUGIN:-}" ]; then echo "$ORTHANC_DICOMWEB_PLUGIN"; return; fi
  local p
  p=$(dpkg -L orthanc-dicomweb 2>/dev/null | grep -E '/libOrthancDicomWeb\.so[.0-9]*$' | head -n1 || true)
  [ -n "$p" ] || p=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
  [ -e "$p" ] || die "DICOMweb plugin not found (apt-get install orthanc-dicomweb, or set ORTHANC_DICOMWEB_PLUGIN)"
  echo "$p"
}

find_orthanc() {
  if [ -n "${ORTHANC_BIN:-}" ]; then echo "$ORTHANC_BIN"; return; fi
  command -v Orthanc 2>/dev/null || { [ -x /usr/sbin/Orthanc ] && echo /usr/sbin/Orthanc; } \
    || die "Orthanc binary not found (apt-get install orthanc, or set ORTHANC_BIN)"
}

write_config() {
  local plugins="\"$1\"" p
  for p in ${ORTHANC_EXTRA_PLUGINS:-}; do
    [ -e "$p" ] || die "plugin $p (ORTHANC_EXTRA_PLUGINS) not found"
    plugins="$plugins, \"$p\""
  done
  mkdir -p "$dir/config"
  rm -f "$dir/config/"*.json
  if [ -n "${ORTHANC_EXTRA_CONFIG:-}" ]; then cp "$ORTHANC_EXTRA_CONFIG" "$dir/config/extra.json"; fi
  cat > "$dir/config/orthanc.json.tmp" <<EOF
{
  "Name" : "deepgrow-test",
  "StorageDirectory" : "$dir/storage",
  "IndexDirectory" : "$dir/storage",
  "StorageCompression" : false,
  "Plugins" : [ $plugins ],
  "HttpServerEnabled" : true,
  "HttpPort" : $HTTP_PORT,
  "HttpDescribeErrors" : true,
  "RemoteAccessAllowed" : false,
  "AuthenticationEnabled" : false,
  "DicomServerEnabled" : true,
  "DicomAet" : "$AET",
  "DicomPort" : $DICOM_PORT,
  "DicomCheckCalledAet" : false,
  "DicomCheckModalityHost" : false,
  "DicomAlwaysAllowEcho" : true,
  "DicomAlwaysAllowStore" : true,
  "DicomAlwaysAllowFind" : true,
  "DicomAlwaysAllowGet" : true,
  "DicomAlwaysAllowMove" : true,
  "DicomModalities" : {
    "deepgrow" : { "AET" : "$CLIENT_AET", "Host" : "127.0.0.1", "Port" : $CLIENT_PORT }
  },
  "DicomModalitiesInDatabase" : false,
  "UnknownSopClassAccepted" : false,
  "SaveJobs" : false,
  "DicomWeb" : {
    "Enable" : true,
    "Root" : "/dicom-web/",
    "EnableWado" : true,
    "WadoRoot" : "/wado",
    "Ssl" : false
  }
}
EOF
  mv "$dir/config/orthanc.json.tmp" "$dir/config/orthanc.json"
}

do_start() {
  local pid; pid=$(recorded_pid)
  if alive "$pid"; then
    if answers; then echo "$pid"; return 0; fi
    die "PID $pid from $pidfile is alive but $URL/system does not answer (another port? see $dir/orthanc.log)"
  fi
  rm -f "$pidfile"
  answers && die "something else already answers on $URL (set ORTHANC_HTTP_PORT)"

  local bin plugin; bin=$(find_orthanc); plugin=$(find_plugin)
  mkdir -p "$dir/storage"
  dir=$(cd "$dir" && pwd); pidfile="$dir/orthanc.pid"
  write_config "$plugin"

  # setsid: own session, so the caller's Ctrl-C / process-group kill does not reach it
  # and it outlives the shell that started it; stop it with `orthanc.sh stop` (SIGTERM).
  setsid "$bin" --logfile="$dir/orthanc.log" "$dir/config" >"$dir/orthanc.stdout" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$pidfile"

  local deadline=$((SECONDS + TIMEOUT))
  until answers; do
    if ! alive "$pid"; then
      rm -f "$pidfile"
      tail -n 20 "$dir/orthanc.log" "$dir/orthanc.stdout" >&2 2>/dev/null || true
      die "Orthanc exited during start-up (port $HTTP_PORT or $DICOM_PORT in use?)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      do_stop; die "Orthanc did not answer $URL/system within ${TIMEOUT}s"
    fi
    sleep 0.1
  done
  log "Orthanc PID $pid: HTTP $URL (DICOMweb $URL/dicom-web/), DICOM $AET@127.0.0.1:$DICOM_PORT"
  echo "$pid"
}

do_upload() {
  do_status >/dev/null || die "Orthanc for $dir is not running"
  local f
  for f in "$@"; do
    curl -fsS --max-time 30 -X POST -H 'Content-Type: application/dicom' \
      --data-binary @"$f" "$URL/instances" >/dev/null || die "upload of $f failed"
  done
}

mkdir -p "$dir"
case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  upload) do_upload "$@" ;;
esac
