-- mod_test_s2s_routes: pin remote XMPP domains to ip:port for tests, without DNS.
--
-- Prosody 0.12 resolves S2S targets through net.adns (SRV, then A/AAAA on 5269)
-- and, with lua-unbound, ignores /etc/hosts. This global module wraps
-- net.adns.resolver() so that "_xmpp-server._tcp.D" SRV queries for a pinned
-- domain D answer { target = ip, port = port } at once ("_xmpps-server" gets no
-- records, so Prosody uses STARTTLS). With test_s2s_routes_strict every other
-- query answers "no records" at once, so a test never waits on real DNS.
--
--   test_s2s_routes = { ["c.test"] = { "127.0.0.4", 5269 } }
--   test_s2s_routes_strict = true

module:set_global();

local adns = require "net.adns";

local routes = module:get_option("test_s2s_routes", {});
local strict = module:get_option_boolean("test_s2s_routes_strict", false);
local original_resolver = adns.resolver;

for domain, pin in pairs(routes) do
	if type(pin) ~= "table" or type(pin[1]) ~= "string" or not tonumber(pin[2]) then
		error(("test_s2s_routes[%q] must be { ip, port }"):format(tostring(domain)));
	end
	module:log("info", "Pinned %s to %s port %d", domain, pin[1], tonumber(pin[2]));
end

-- The answer for a query, or nil to let the real resolver answer it.
local function pinned_answer(qname, qtype)
	if qtype == "SRV" then
		local service, domain = qname:match("^_([%w%-]+)%._tcp%.(.+)$");
		local pin = domain and routes[domain];
		if pin then
			if service == "xmpp-server" then
				return { { srv = { priority = 0; weight = 0; port = tonumber(pin[2]); target = pin[1] } } };
			end
			return {};
		end
	end
	if strict then
		return {};
	end
	return nil;
end

local function wrap(resolver)
	local wrapped = {};
	function wrapped:lookup(handler, qname, qtype, qclass)
		local answer = pinned_answer(qname, qtype);
		if answer == nil then
			return resolver:lookup(handler, qname, qtype, qclass);
		end
		module:log("debug", "Answering %s %s from test_s2s_routes (%d records)", qtype, qname, #answer);
		handler(answer);
		return true;
	end
	return setmetatable(wrapped, { __index = resolver });
end

adns.resolver = function (...)
	return wrap(original_resolver(...));
end

function module.unload()
	adns.resolver = original_resolver;
end
