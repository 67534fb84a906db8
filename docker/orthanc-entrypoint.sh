#!/bin/sh
# Entry point of the lungburden-orthanc image: Orthanc with the configuration file(s) given as
# arguments (default /etc/lungburden/orthanc.json). The configurations name the user
# orthanc:${ORTHANC_PASSWORD}; the password comes from ORTHANC_PASSWORD or, for Docker/Compose
# secrets, from the file named by ORTHANC_PASSWORD_FILE. Without one Orthanc is not started.
set -eu
if [ "$#" -eq 0 ]; then
    set -- /etc/lungburden/orthanc.json
fi
case "$1" in
    -*|/*) ;;
    *) exec "$@" ;;   # another program, e.g. `docker run -it lungburden-orthanc bash`
esac
if [ -n "${ORTHANC_PASSWORD_FILE:-}" ]; then
    ORTHANC_PASSWORD=$(cat "$ORTHANC_PASSWORD_FILE")
    export ORTHANC_PASSWORD
fi
if [ -z "${ORTHANC_PASSWORD:-}" ]; then
    echo "lungburden-orthanc: set ORTHANC_PASSWORD or ORTHANC_PASSWORD_FILE (password of the user orthanc)" >&2
    exit 78
fi
exec Orthanc "$@"
