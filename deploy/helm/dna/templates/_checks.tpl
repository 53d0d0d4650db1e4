{{/* Rules of the nodes' config models that values.schema.json cannot state: one setting
     compared with another (or with the other's default when it is unset), a length in
     bytes rather than characters, an address's syntax. The node refuses such a config at
     start, so without these checks `helm install` succeeded and the pods crash-looped;
     now rendering fails with the value's name and what to set. Each default below is the
     config model's (tests/deploy/test_chart.py renders each rule at its boundary, read from
     the models, so a default changed in one place and not the other fails there). */}}

{{/* Stops the render with the message given, in `helm lint` too. Lint renders in Helm's
     lint mode, whose `fail` only logs an "[INFO] Fail:" line and returns, so bad values
     passed `helm lint` (exit 0) and only `helm install` or `helm template` refused them.
     Past `fail` only lint mode goes on, to include a template named after the message,
     which exists nowhere: an error lint reports ("[ERROR] ... no template \"refused: ...\""),
     and exits 1. Every check in the chart stops through this, never `fail` alone. */}}
{{- define "dna.fail" -}}
{{- fail . -}}
{{- include (printf "refused: %s" .) dict -}}
{{- end -}}

{{/* "N" when the value is set, "N, the node's default" when it is not: a message must
     say where a number it names comes from. Call with (list $section "key" default). */}}
{{- define "dna.setting" -}}
{{- $section := index . 0 -}}{{- $key := index . 1 -}}
{{- if hasKey $section $key -}}
{{- int (index $section $key) -}}
{{- else -}}
{{- printf "%d, the node's default" (int (index . 2)) -}}
{{- end -}}
{{- end -}}

{{/* A storage node's [storage] and [admission] (dna_storage.node.StorageSection,
     dna_storage.admission.AdmissionConfig). A bootstrap node's sections have no such rule
     left: its address and seeds, the ones its validators check, are the chart's own. */}}
{{- define "dna.checkStorageConfig" -}}
{{- $storage := default dict .Values.storage.config.storage -}}
{{- $ttl := int (dig "ttl_days" 30 $storage) -}}
{{- $maxTtl := int (dig "max_ttl_days" 30 $storage) -}}
{{- if not (and (gt $ttl 0) (le $ttl $maxTtl)) -}}
{{- include "dna.fail" (printf "storage.config.storage.ttl_days (%d) must be more than 0 and at most storage.config.storage.max_ttl_days (%s): set ttl_days within 1..max_ttl_days, or raise max_ttl_days" $ttl (include "dna.setting" (list $storage "max_ttl_days" 30))) -}}
{{- end -}}
{{- $admission := default dict .Values.storage.config.admission -}}
{{- $base := int (dig "pow_base_bits" 12 $admission) -}}
{{- $max := int (dig "pow_max_bits" 24 $admission) -}}
{{- if gt $base $max -}}
{{- include "dna.fail" (printf "storage.config.admission.pow_base_bits (%d) must not exceed storage.config.admission.pow_max_bits (%s): lower pow_base_bits or raise pow_max_bits" $base (include "dna.setting" (list $admission "pow_max_bits" 24))) -}}
{{- end -}}
{{- end -}}

{{/* The relay's [auth] and [relay] (dna_stun.config.AuthSection, RelaySection). */}}
{{- define "dna.checkStunConfig" -}}
{{- $relay := default dict .Values.stun.config.relay -}}
{{- $default := int (dig "default_lifetime_s" 600 $relay) -}}
{{- $max := int (dig "max_lifetime_s" 3600 $relay) -}}
{{- if gt $default $max -}}
{{- include "dna.fail" (printf "stun.config.relay.default_lifetime_s (%d) must not exceed stun.config.relay.max_lifetime_s (%s): lower default_lifetime_s or raise max_lifetime_s" $default (include "dna.setting" (list $relay "max_lifetime_s" 3600))) -}}
{{- end -}}
{{- /* The schema's maxLength counts characters; the relay counts UTF-8 bytes (MAX_REALM_BYTES),
       and so does `len`. */ -}}
{{- $realm := toString (dig "realm" "dna" (default dict .Values.stun.config.auth)) -}}
{{- if gt (len $realm) 16 -}}
{{- include "dna.fail" (printf "stun.config.auth.realm (%q) is %d bytes in UTF-8, at most 16: it goes in every 401 challenge, which must fit three times the smallest request (a bare Refresh, 20 bytes) or that client is never answered; choose a shorter realm (e.g. \"dna\" or your domain's first label)" $realm (len $realm)) -}}
{{- end -}}
{{- range $key := list "allowed_peers" "denied_peers" -}}
{{- range $cidr := (dig $key list $relay) -}}
{{- if not (include "dna.isNetwork" (toString $cidr)) -}}
{{- include "dna.fail" (printf "stun.config.relay.%s: %q is not an address or network: write one as \"10.0.0.0/8\", \"2001:db8::/32\" or \"192.0.2.7\"" $key (toString $cidr)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" if the string is an address or network Python's ipaddress.ip_network(strict=False)
     takes, as the relay parses [relay] allowed_peers and denied_peers; "" if not. Exact but
     for one case, which the relay still refuses at start: an IPv4 netmask or hostmask after
     the slash is taken for its shape (four octets), not checked to be a valid mask. */}}
{{- define "dna.isNetwork" -}}
{{- $octet := "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])" -}}
{{- $v4 := printf "%s(\\.%s){3}" $octet $octet -}}
{{- $h := "[0-9A-Fa-f]{1,4}" -}}
{{- /* The eight groups, with at most one "::" (RFC 4291 section 2.2); an IPv4 address at the
       end stands for the last two groups, and a zone (%eth0) is allowed after it. */ -}}
{{- $v6 := list
  (printf "(%s:){7}%s" $h $h)
  (printf "(%s:){1,7}:" $h)
  (printf "(%s:){1,6}:%s" $h $h)
  (printf "(%s:){1,5}(:%s){1,2}" $h $h)
  (printf "(%s:){1,4}(:%s){1,3}" $h $h)
  (printf "(%s:){1,3}(:%s){1,4}" $h $h)
  (printf "(%s:){1,2}(:%s){1,5}" $h $h)
  (printf "%s:(:%s){1,6}" $h $h)
  (printf ":((:%s){1,7}|:)" $h)
-}}
{{- $network := splitn "/" 2 . -}}
{{- $address := $network._0 -}}
{{- $prefix := ternary "" (printf "/%s" $network._1) (eq (len (splitList "/" .)) 1) -}}
{{- if regexMatch (printf "^%s$" $v4) $address -}}
{{- if regexMatch (printf "^(/0*(3[0-2]|[12]?[0-9])|/%s)?$" $v4) $prefix -}}true{{- end -}}
{{- else if contains ":" $address -}}
{{- $hex := regexReplaceAll (printf ":%s$" $v4) (regexReplaceAll "%[^%]+$" $address "") ":0:0" -}}
{{- if and (regexMatch (printf "^(%s)$" (join "|" $v6)) $hex) (regexMatch "^(/0*(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$" $prefix) -}}true{{- end -}}
{{- end -}}
{{- end -}}
