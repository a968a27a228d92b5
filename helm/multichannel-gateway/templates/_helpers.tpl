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

{{/* Whether [sinks.<name>] is on: its table is present and `enabled` is not false. */}}
{{- define "mcg.sinkEnabled" -}}
{{- $sinks := .root.Values.config.sinks | default dict -}}
{{- if and (hasKey $sinks .name) (kindIs "map" (index $sinks .name)) -}}
{{- if ne (toString (dig "enabled" true (index $sinks .name))) "false" -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mcg.scaledOut" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}true{{- end -}}
{{- end -}}

{{/* /metrics on the http port when config.server.metrics_port equals config.server.port. */}}
{{- define "mcg.metricsPortName" -}}
{{- if eq (int .Values.config.server.metrics_port) (int .Values.config.server.port) -}}http{{- else -}}metrics{{- end -}}
{{- end -}}

{{/*
Secret key names, as gateway/config.py redacts them (SECRET_KEYS, or a name ending in _secret,
_token, _key, password), compared case-insensitively with "-" read as "_", plus the HTTP
credential headers Authorization and Proxy-Authorization.
*/}}
{{- define "mcg.isSecretName" -}}
{{- $k := . | toString | lower | replace "-" "_" -}}
{{- $names := list "app_secret" "verify_token" "access_token" "api_token" "api_key" "redis_url" "password" "token" "secret" "authorization" "proxy_authorization" -}}
{{- if or (has $k $names) (hasSuffix "_secret" $k) (hasSuffix "_token" $k) (hasSuffix "_key" $k) (hasSuffix "password" $k) -}}true{{- end -}}
{{- end -}}

{{/* A reference the gateway resolves (gateway/config.py): {env: NAME} or {file: PATH}, one key. */}}
{{- define "mcg.isSecretRef" -}}
{{- if and (kindIs "map" .) (eq (len .) 1) -}}
{{- $ref := . -}}
{{- range $kind := list "env" "file" -}}
{{- if and (hasKey $ref $kind) (kindIs "string" (index $ref $kind)) (ne (index $ref $kind) "") -}}true{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Walk config (maps and lists): a secret-named key may hold only "", null or a reference. */}}
{{- define "mcg.secretWalk" -}}
{{- $path := index . 0 -}}
{{- $value := index . 1 -}}
{{- if kindIs "map" $value -}}
{{- range $key, $v := $value -}}
{{- $p := printf "%s.%s" $path $key -}}
{{- if include "mcg.isSecretName" $key -}}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v "")) (include "mcg.isSecretRef" $v)) -}}
{{- $parts := splitList "." $p -}}
{{- $own := and (not (contains "[" $p)) (or (and (has (index $parts 1) (list "server" "queue")) (eq (len $parts) 3)) (and (has (index $parts 1) (list "channels" "sinks")) (eq (len $parts) 4))) -}}
{{- $hint := ternary "" " Note: the gateway resolves {env}/{file} references at any depth, inside lists and nested tables too (e.g. channels.whatsapp.accounts[].access_token: {env: WA_TOKEN_2}, sinks.forward.headers.Authorization: {env: FORWARD_AUTH}); an account without access_token sends with the channel's token (WHATSAPP_ACCESS_TOKEN)." $own -}}
{{- fail (printf "%s is a secret and would be written in plain text into the ConfigMap: put the value under `secrets` (or in the Secret named by `existingSecret`) and reference it as {env: NAME} (or mount it with extraVolumes and use {file: PATH}); for the documented keys the variable alone is enough (e.g. WHATSAPP_ACCESS_TOKEN, GATEWAY_API_TOKEN, OPENAI_API_KEY). See docs/kubernetes.md, Secrets.%s" $p $hint) -}}
{{- end -}}
{{- else -}}
{{- include "mcg.secretWalk" (list $p $v) -}}
{{- end -}}
{{- end -}}
{{- else if kindIs "slice" $value -}}
{{- range $i, $v := $value -}}
{{- include "mcg.secretWalk" (list (printf "%s[%d]" $path $i) $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Enabled channels with no app secret from the values (NOTES warns: the gateway exits 2). */}}
{{- define "mcg.missingAppSecrets" -}}
{{- if not (or .Values.existingSecret .Values.config.server.insecure_skip_signature) -}}
{{- $secrets := .Values.secrets | default dict -}}
{{- $env := list -}}
{{- range .Values.extraEnv -}}{{- $env = append $env .name -}}{{- end -}}
{{- $missing := list -}}
{{- range $name, $table := (.Values.config.channels | default dict) -}}
{{- if and (kindIs "map" $table) (ne (toString (dig "enabled" true $table)) "false") -}}
{{- $own := printf "%s_APP_SECRET" (upper $name) -}}
{{- $found := or (get $secrets "META_APP_SECRET") (get $secrets $own) (has "META_APP_SECRET" $env) (has $own $env) (include "mcg.isSecretRef" (get $table "app_secret")) -}}
{{- if not $found -}}{{- $missing = append $missing $name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- join ", " $missing -}}
{{- end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds: the gateway waits up to shutdown_timeout for in-flight requests
(gateway/server.py), up to shutdown_timeout again for the journal and sinks (gateway/app.py), then
up to 5 s for outbound sends; the preStop sleep comes first and 5 s of margin last.
*/}}
{{- define "mcg.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds -}}
{{- $drain := int (ceil .Values.config.server.shutdown_timeout) -}}
{{- add (mul 2 $drain) 5 (int .Values.shutdown.preStopSleepSeconds) 5 -}}
{{- else -}}
{{- int .Values.shutdown.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* The guard: refuse values that would run but lose, leak or corrupt data. */}}
{{- define "mcg.guard" -}}
{{- $redis := eq (include "mcg.redis" .) "true" -}}
{{- if and (include "mcg.scaledOut" .) (not $redis) -}}
{{- fail "replicaCount > 1 or autoscaling.enabled requires config.queue.backend=\"redis\": the embedded SQLite journal has exactly one writer (set redis.url or redis.existingSecret too)" -}}
{{- end -}}
{{- if and $redis (not (or .Values.redis.url .Values.redis.existingSecret)) -}}
{{- fail "config.queue.backend=\"redis\" needs redis.url or redis.existingSecret" -}}
{{- end -}}
{{- if and .Values.existingSecret .Values.redis.url (not .Values.redis.existingSecret) -}}
{{- fail "redis.url is set together with existingSecret: the chart then creates no Secret, so the URL would never reach the pods (the gateway would use redis://127.0.0.1:6379/0). Keep the URL in a Secret and set redis.existingSecret (and redis.existingSecretKey), e.g. redis.existingSecret=<your existingSecret> redis.existingSecretKey=GATEWAY_REDIS_URL, and remove redis.url" -}}
{{- end -}}
{{- if and $redis (include "mcg.scaledOut" .) (include "mcg.sinkEnabled" (dict "root" . "name" "storage")) -}}
{{- fail "config.sinks.storage is enabled with several replicas: the storage sink is SQLite on one pod's disk (an emptyDir with the redis backend), so each replica would keep its own partial copy. With several replicas use the firestore sink or another shared sink, or disable it (config.sinks.storage: null, or {enabled: false})" -}}
{{- end -}}
{{- include "mcg.secretWalk" (list "config" .Values.config) -}}
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
{ {{- $first := true -}}{{- range $k, $v := . -}}{{- if not $first -}}, {{ end -}}{{- $first = false -}}{{ include "mcg.tomlKey" $k }} = {{ include "mcg.tomlValue" $v }}{{- end -}} }
{{- else -}}
{{- fail (printf "config value %v cannot be written as TOML" .) -}}
{{- end -}}
{{- end -}}

{{/* A bare TOML key when it can be one, else a quoted key. */}}
{{- define "mcg.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" (toString .) -}}{{ . }}{{- else -}}{{ . | toString | toJson }}{{- end -}}
{{- end -}}

{{- define "mcg.tomlTable" -}}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{ include "mcg.tomlKey" $k }} = {{ include "mcg.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mcg.toml" -}}
# Rendered by the multichannel-gateway chart from .Values.config. Secrets come from the
# environment (the chart's Secret), never from this file.
{{- range $section, $body := .Values.config }}
{{- if or (eq $section "channels") (eq $section "sinks") }}
{{- range $name, $table := $body }}

[{{ $section }}.{{ include "mcg.tomlKey" $name }}]
{{- include "mcg.tomlTable" ($table | default dict) }}
{{- end }}
{{- else }}

[{{ $section }}]
{{- include "mcg.tomlTable" $body }}
{{- end }}
{{- end }}
{{- end -}}
