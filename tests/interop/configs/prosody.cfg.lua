-- Prosody 0.12 test peer: the whole domain ${domain} is an XEP-0114 component.
-- Rendered by tests/interop/harness.py (string.Template); one work directory per peer.
local base = "${workdir}"

run_as_root = true
pidfile = base .. "/prosody.pid"
data_path = base .. "/data"
plugin_paths = { "${plugin_dir}" }
log = {
	{ levels = { min = "debug" }, to = "file", filename = base .. "/debug.log" };
	{ levels = { min = "info" }, to = "console" };
}

interfaces = { "${ip}" }
s2s_ports = { ${s2s_port} }
s2s_interfaces = { "${ip}" }
component_ports = { ${component_port} }
component_interfaces = { "${ip}" }
c2s_ports = { }
c2s_direct_tls_ports = { }
s2s_direct_tls_ports = { }
http_ports = { }
https_ports = { }

-- extra_modules: "tls" except in plaintext mode (then no STARTTLS at all), "s2s_bidi" unless off,
-- "smacks" when asked (XEP-0198, on S2S too)
modules_enabled = { "dialback"; "saslauth"; "disco"; "ping"; ${extra_modules} "test_s2s_routes" }
test_s2s_routes = { ${routes} }
test_s2s_routes_strict = true

ssl = { cafile = "${cafile}" }
s2s_require_encryption = ${require_encryption}
s2s_secure_auth = ${secure_auth}

VirtualHost "localhost"
	modules_disabled = { "s2s" }

Component "${domain}"
	component_secret = "${secret}"
	ssl = { certificate = "${certfile}"; key = "${keyfile}" }
