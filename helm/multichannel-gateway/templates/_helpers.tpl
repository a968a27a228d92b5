{{/* Names */}}
{{- define "mcg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mcg.fullname" -}}
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

{{- define "mcg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mcg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mcg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mcg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mcg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mcg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mcg.secretName" -}}
{{- default (include "mcg.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "mcg.redis" -}}
{{- eq (.Values.config.queue.backend | default "sqlite") "redis" -}}
{{- end -}}

{{/* The guard: the SQLite journal has exactly one writer. */}}
{{- define "mcg.guard" -}}
{{- if and (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) (ne (include "mcg.redis" .) "true") -}}
{{- fail "replicaCount > 1 or autoscaling.enabled requires config.queue.backend=\"redis\": the embedded SQLite journal has exactly one writer (set redis.url or redis.existingSecret too)" -}}
{{- end -}}
{{- if and (eq (include "mcg.redis" .) "true") (not (or .Values.redis.url .Values.redis.existingSecret)) -}}
{{- fail "config.queue.backend=\"redis\" needs redis.url or redis.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/* TOML rendering of .Values.config: [section] tables and [channels.x] / [sinks.x] tables. */}}
{{- define "mcg.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- . | toJson -}}
{{- else if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{- if $i -}}, {{ end -}}{{- include "mcg.tomlValue" $e -}}{{- end -}}]
{{- else if kindIs "map" . -}}
{ {{- $first := true -}}{{- range $k, $v := . -}}{{- if not $first -}}, {{ end -}}{{- $first = false -}}{{ $k }} = {{ include "mcg.tomlValue" $v }}{{- end -}} }
{{- else -}}
{{- fail (printf "config value %v cannot be written as TOML" .) -}}
{{- end -}}
{{- end -}}

{{- define "mcg.tomlTable" -}}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{ $k }} = {{ include "mcg.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mcg.toml" -}}
# Rendered by the multichannel-gateway chart from .Values.config. Secrets come from the
# environment (the chart's Secret), never from this file.
{{- range $section, $body := .Values.config }}
{{- if or (eq $section "channels") (eq $section "sinks") }}
{{- range $name, $table := $body }}

[{{ $section }}.{{ $name }}]
{{- include "mcg.tomlTable" ($table | default dict) }}
{{- end }}
{{- else }}

[{{ $section }}]
{{- include "mcg.tomlTable" $body }}
{{- end }}
{{- end }}
{{- end -}}
