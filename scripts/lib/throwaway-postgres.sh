# A throwaway Postgres from the system's binaries (installed from Debian's
# packages when missing and run as root), on a free local port in a temp dir.
# Sourced by scripts/test and scripts/bench-postgres; the caller traps
# stop_postgres. The server takes TLS (ssl=on) with a certificate for
# 127.0.0.1 and localhost signed by a CA made here, and plain connections too,
# except from the role quotad_tls_only, which it accepts over TLS only
# (tests/postgres/tls.rs).

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$dir" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "throwaway-postgres: installing PostgreSQL from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -n "$dir" ] || { echo "throwaway-postgres: no PostgreSQL binaries under /usr/lib/postgresql" >&2; return 1; }
  echo "$dir"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# postgres_tls DIR: a CA (ca.crt) and a certificate it signed for 127.0.0.1
# and localhost (server.crt, server.key), valid for a week. P-256 keys: made
# in milliseconds.
postgres_tls() {
  local dir=$1 curve=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  mkdir -p "$dir"
  openssl req -x509 "${curve[@]}" -days 7 -subj "/CN=quotad throwaway Postgres CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null &&
    openssl req -new "${curve[@]}" -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null &&
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 7 \
      -extfile <(printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=CA:FALSE' \
        'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth') \
      -out "$dir/server.crt" 2>/dev/null ||
    { echo "throwaway-postgres: openssl could not make the TLS certificates" >&2; return 1; }
  chmod 600 "$dir/server.key"
}

# start_postgres [fsync=on|off]: sets postgres_url to a new database "quotad_test"
# and exports QUOTAD_TEST_DATABASE_CA, the CA of the server's certificate.
start_postgres() {
  local bin port fsync=${1:-fsync=on}
  bin=$(pg_bindir)
  pg_dir=$(mktemp -d)
  port=$(free_port)
  # initdb refuses to run as root: run the server as the postgres user then.
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$pg_dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >"$pg_dir/initdb.log" 2>&1 ||
    { cat "$pg_dir/initdb.log" >&2; return 1; }
  postgres_tls "$pg_dir/tls" || return 1
  # First match wins: quotad_tls_only is refused without TLS before the
  # catch-all line would let it in.
  printf '%s\n' 'local     all all                            trust' \
    'hostssl   all quotad_tls_only 127.0.0.1/32   trust' \
    'hostnossl all quotad_tls_only 127.0.0.1/32   reject' \
    'host      all all             127.0.0.1/32   trust' >"$pg_dir/pg_hba.conf"
  # The server's key must belong to the user the server runs as.
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$pg_dir/tls" "$pg_dir/pg_hba.conf"; fi
  "${as[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
    -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c $fsync -c hba_file=$pg_dir/pg_hba.conf \
        -c ssl=on -c ssl_cert_file=$pg_dir/tls/server.crt -c ssl_key_file=$pg_dir/tls/server.key" start >/dev/null ||
    { cat "$pg_dir/server.log" >&2; return 1; }
  pg_stop=("${as[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -m immediate stop)
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres quotad_test
  "$bin/createuser" -h 127.0.0.1 -p "$port" -U postgres quotad_tls_only
  export QUOTAD_TEST_DATABASE_CA="$pg_dir/tls/ca.crt"
  postgres_url="postgres://postgres@127.0.0.1:$port/quotad_test"
  echo "throwaway-postgres: throwaway Postgres on 127.0.0.1:$port" >&2
}

stop_postgres() {
  if [ -n "${pg_dir:-}" ]; then
    "${pg_stop[@]}" >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}

