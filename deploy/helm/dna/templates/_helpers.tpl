{{/* Names and labels. */}}
{{- define "dna.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dna.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A role's object name: <fullname>-bootstrap, <fullname>-storage (StatefulSet names
     stay short enough for the controller-revision-hash label). */}}
{{- define "dna.roleName" -}}
{{- printf "%s-%s" (include "dna.fullname" .root | trunc 45 | trimSuffix "-") .role -}}
{{- end -}}

{{- define "dna.headlessName" -}}
{{- printf "%s-hl" (include "dna.roleName" .) -}}
{{- end -}}

{{- define "dna.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dna.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dna.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dna.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dna
{{- end -}}

{{/* Labels of one role: call with (dict "root" $ "role" "storage"). */}}
{{- define "dna.roleSelectorLabels" -}}
{{ include "dna.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "dna.roleLabels" -}}
{{ include "dna.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "dna.image" -}}
{{- $name := index .root.Values.image .role -}}
{{- $repo := ternary $name (printf "%s/%s" (trimSuffix "/" .root.Values.image.registry) $name) (empty .root.Values.image.registry) -}}
{{- printf "%s:%s" $repo (toString .root.Values.image.tag) -}}
{{- end -}}

{{- define "dna.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dna.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* host:port of every bootstrap pod by its stable DNS name; the nodes resolve the names
     themselves, on every join attempt (docs/operations.md). */}}
{{- define "dna.bootstrapSeeds" -}}
{{- $boot := dict "root" . "role" "bootstrap" -}}
{{- $seeds := list -}}
{{- range $i := until (int .Values.bootstrap.replicas) -}}
{{- $seeds = append $seeds (printf "%s-%d.%s.%s.svc.%s:%d" (include "dna.roleName" $boot) $i (include "dna.headlessName" $boot) $.Release.Namespace $.Values.clusterDomain (int $.Values.ports.udp)) -}}
{{- end -}}
{{- join "," $seeds -}}
{{- end -}}

{{/* A node's TOML file: the chart's own settings, then the role's `config` sections over
     them. Values are written as JSON, which is valid TOML for strings, numbers, booleans
     and arrays of them. */}}
{{- define "dna.toml" -}}
{{- $root := .root -}}
{{- $sections := dict
  "node" (dict "udp_port" $root.Values.ports.udp "grpc_port" $root.Values.ports.grpc "key_file" "/data/node.key")
  "overlay" (dict "bootstrap" (splitList "," (include "dna.bootstrapSeeds" $root)))
  "records" (dict "path" "/data/records.sqlite3")
  "ops" (dict "http_port" $root.Values.ports.http)
-}}
{{- if eq .role "storage" -}}
{{- $_ := set $sections "storage" (dict "backend" "sqlite" "data_dir" "/data/mailboxes") -}}
{{- end -}}
{{- $sections = mergeOverwrite $sections (deepCopy (index $root.Values .role).config) -}}
{{- include "dna.renderToml" (dict "root" $root "sections" $sections) -}}
{{- end -}}

{{/* The relay's TOML file (dna-stun): its ports, then `stun.config` over them. The address
     comes from the pod (env), the shared secret from a Secret (env). An allocation takes a
     relay port, so max_allocations is at most the range's size (1000 at most by default). */}}
{{- define "dna.stunToml" -}}
{{- $v := .Values.stun -}}
{{- $ports := add1 (sub (int $v.relayPortMax) (int $v.relayPortMin)) -}}
{{- $sections := dict
  "server" (dict "udp_port" $v.udpPort "relay_port_min" $v.relayPortMin "relay_port_max" $v.relayPortMax)
  "relay" (dict "max_allocations" (min 1000 $ports))
  "ops" (dict "http_port" .Values.ports.http)
-}}
{{- $sections = mergeOverwrite $sections (deepCopy $v.config) -}}
{{- include "dna.renderToml" (dict "root" . "sections" $sections) -}}
{{- end -}}

{{/* log_level, then each section with its keys, sorted. */}}
{{- define "dna.renderToml" -}}
{{- $sections := .sections -}}
log_level = {{ .root.Values.logLevel | toJson }}
{{- range $name := keys $sections | sortAlpha }}

[{{ $name }}]
{{- $section := index $sections $name }}
{{- range $key := keys $section | sortAlpha }}
{{ $key }} = {{ index $section $key | toJson }}
{{- end }}
{{- end }}
{{- end -}}
