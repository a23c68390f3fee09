{{/* Names, labels, images and the pieces every Ray pod shares. */}}

{{- define "calm-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name prefixes every object. KubeRay limits a RayCluster name to 53 and a RayJob name to
47 characters (it appends service suffixes) and wants a DNS-1035 label: 40 leaves room for "-train".
*/}}
{{- define "calm-stream.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else if contains (include "calm-stream.name" .) .Release.Name -}}
{{- $name = .Release.Name -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name (include "calm-stream.name" .) -}}
{{- end -}}
{{- $name = $name | trunc 40 | trimSuffix "-" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "name %q must be a DNS-1035 label (start with a letter): set fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "calm-stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "calm-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "calm-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "calm-stream.labels" -}}
helm.sh/chart: {{ include "calm-stream.chart" . }}
{{ include "calm-stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: calm-stream
{{- end -}}

{{/* Labels of one component's pods: pass (dict "root" $ "component" "head"). */}}
{{- define "calm-stream.componentSelectorLabels" -}}
{{ include "calm-stream.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "calm-stream.componentLabels" -}}
{{ include "calm-stream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "calm-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "calm-stream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; pass (dict "image" .Values.images.runtime "root" $). */}}
{{- define "calm-stream.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "calm-stream.settingsConfigMap" -}}
{{- printf "%s-settings" (include "calm-stream.fullname" .) -}}
{{- end -}}

{{- define "calm-stream.pvcName" -}}
{{- default (printf "%s-data" (include "calm-stream.fullname" .)) .Values.storage.pvc.existingClaim -}}
{{- end -}}

{{/* Root of the registry: the object store when set, else the volume. */}}
{{- define "calm-stream.objectRoot" -}}
{{- with .Values.storage.objectStore.uri -}}
{{- if not (hasPrefix "s3://" .) -}}
{{- fail (printf "storage.objectStore.uri %q must start with s3://" .) -}}
{{- end -}}
{{- trimSuffix "/" . -}}
{{- else -}}
{{- trimSuffix "/" .Values.storage.mountPath -}}
{{- end -}}
{{- end -}}

{{/* The sink commits with fsync + rename under a flock: only a local path will do. */}}
{{- define "calm-stream.sinksRoot" -}}
{{- $root := default (printf "%s/sinks" (trimSuffix "/" .Values.storage.mountPath)) .Values.settings.sinks.root -}}
{{- if and (contains "://" $root) (not (hasPrefix "file://" $root)) -}}
{{- fail (printf "settings.sinks.root %q: the sink needs a local path on the volume, not an object store" $root) -}}
{{- end -}}
{{- $root -}}
{{- end -}}

{{- define "calm-stream.registry" -}}
{{- default (printf "%s/registry" (include "calm-stream.objectRoot" .)) .Values.settings.model.registry -}}
{{- end -}}

{{- define "calm-stream.kafkaTlsDir" -}}/etc/calm-stream/kafka-tls{{- end -}}

{{/*
The settings as a flat map CALM_STREAM_<SECTION>__<FIELD> -> string, from .Values.settings plus what
the chart derives (storage paths, TLS file paths). Nested sections recurse; a dict-valued setting
(pricing.node_price_per_hour) is JSON, a list is comma-separated, numbers go through toJson so that
1000000 stays 1000000 (Helm holds numbers as float64 and would print 1e+06).
*/}}
{{- define "calm-stream.settingsEnv" -}}
{{- $settings := deepCopy .Values.settings -}}
{{- $_ := set $settings.sinks "root" (include "calm-stream.sinksRoot" .) -}}
{{- $_ := set $settings.model "registry" (include "calm-stream.registry" .) -}}
{{- $tls := .Values.kafkaCredentials.tls -}}
{{- if $tls.secretName -}}
{{- $dir := include "calm-stream.kafkaTlsDir" . -}}
{{- $_ := set $settings.kafka "ssl_cafile" (printf "%s/%s" $dir $tls.caFile) -}}
{{- if $tls.certFile }}{{ $_ := set $settings.kafka "ssl_certfile" (printf "%s/%s" $dir $tls.certFile) }}{{ end -}}
{{- if $tls.keyFile }}{{ $_ := set $settings.kafka "ssl_keyfile" (printf "%s/%s" $dir $tls.keyFile) }}{{ end -}}
{{- end -}}
{{- $env := dict -}}
{{- include "calm-stream.flattenSettings" (dict "prefix" "CALM_STREAM_" "node" $settings "out" $env "json" (list "NODE_PRICE_PER_HOUR")) -}}
{{- toYaml $env -}}
{{- end -}}

{{- define "calm-stream.flattenSettings" -}}
{{- range $key, $value := .node -}}
{{- $name := printf "%s%s" $.prefix (upper $key) -}}
{{- if kindIs "invalid" $value -}}
{{- else if and (kindIs "map" $value) (not (has (upper $key) $.json)) -}}
{{- include "calm-stream.flattenSettings" (dict "prefix" (printf "%s__" $name) "node" $value "out" $.out "json" $.json) -}}
{{- else if kindIs "map" $value -}}
{{- $_ := set $.out $name (toJson $value) -}}
{{- else if kindIs "slice" $value -}}
{{- $_ := set $.out $name (join "," $value) -}}
{{- else if kindIs "string" $value -}}
{{- $_ := set $.out $name $value -}}
{{- else -}}
{{- $_ := set $.out $name (toJson $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A quantity (a number or "500m", "2Gi", "1e3") in base units, as a float. */}}
{{- define "calm-stream.quantity" -}}
{{- $text := toString . -}}
{{- $suffix := regexFind "([KMGTPE]i|[numkMGTPE])$" $text -}}
{{- $scale := get (dict "" 1.0 "n" 1e-9 "u" 1e-6 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0) $suffix -}}
{{- mulf (float64 (trimSuffix $suffix $text)) $scale -}}
{{- end -}}

{{/* The API server refuses a container whose request exceeds its limit: fail at render. */}}
{{- define "calm-stream.requestsWithinLimits" -}}
{{- range $name, $request := .resources.requests -}}
{{- $limit := index $.resources.limits $name -}}
{{- if and (not (kindIs "invalid" $limit)) (gt (float64 (include "calm-stream.quantity" $request)) (float64 (include "calm-stream.quantity" $limit))) -}}
{{- fail (printf "%s: requests.%s %v exceeds limits.%s %v" $.where $name $request $name $limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The checks that values.schema.json cannot express. */}}
{{- define "calm-stream.validate" -}}
{{- $kafka := .Values.settings.kafka -}}
{{- if not $kafka.bootstrap_servers -}}
{{- fail "settings.kafka.bootstrap_servers is required: there is no embedded broker in a cluster" -}}
{{- end -}}
{{- if hasPrefix "SASL_" $kafka.security_protocol -}}
{{- if not (and $kafka.sasl_mechanism $kafka.sasl_username .Values.kafkaCredentials.saslPassword.secretName) -}}
{{- fail (printf "security_protocol %s needs settings.kafka.sasl_mechanism, settings.kafka.sasl_username and kafkaCredentials.saslPassword.secretName" $kafka.security_protocol) -}}
{{- end -}}
{{- end -}}
{{- $tls := .Values.kafkaCredentials.tls -}}
{{- if and $tls.secretName (not (has $kafka.security_protocol (list "SSL" "SASL_SSL"))) -}}
{{- fail "kafkaCredentials.tls is set but settings.kafka.security_protocol is neither SSL nor SASL_SSL" -}}
{{- end -}}
{{- if ne (empty $tls.certFile) (empty $tls.keyFile) -}}
{{- fail "kafkaCredentials.tls.certFile and keyFile go together (mutual TLS)" -}}
{{- end -}}
{{- $blocks := dict "ray.head.resources" .Values.ray.head.resources "ray.autoscaling.resources" .Values.ray.autoscaling.resources "pipeline.resources" .Values.pipeline.resources -}}
{{- range $part := list "head" "worker" "submitter" -}}
{{- $_ := set $blocks (printf "training.%s.resources" $part) (index $.Values.training $part).resources -}}
{{- end -}}
{{- range $name, $group := .Values.ray.workerGroups -}}
{{- $_ := set $blocks (printf "ray.workerGroups.%s.resources" $name) $group.resources -}}
{{- end -}}
{{- range $where, $resources := $blocks -}}
{{- include "calm-stream.requestsWithinLimits" (dict "where" $where "resources" $resources) -}}
{{- end -}}
{{- $mount := trimSuffix "/" .Values.storage.mountPath -}}
{{- if has $mount (list "/tmp" "/tmp/ray" (include "calm-stream.kafkaTlsDir" .) "/etc/calm-stream/train") -}}
{{- fail (printf "storage.mountPath %s is where the chart mounts a volume of its own (/tmp, /tmp/ray, /etc/calm-stream/*): choose another path" $mount) -}}
{{- end -}}
{{- $windows := .Values.settings.windows -}}
{{- if eq (toString $windows.kind) "sliding" -}}
{{- if kindIs "invalid" $windows.slide_seconds -}}
{{- fail "settings.windows.kind sliding needs settings.windows.slide_seconds" -}}
{{- else if and (not (kindIs "invalid" $windows.size_seconds)) (gt (float64 $windows.slide_seconds) (float64 $windows.size_seconds)) -}}
{{- fail "settings.windows.slide_seconds must not exceed settings.windows.size_seconds" -}}
{{- end -}}
{{- else if not (kindIs "invalid" $windows.slide_seconds) -}}
{{- fail "settings.windows.slide_seconds applies only to settings.windows.kind sliding" -}}
{{- end -}}
{{- $pricing := .Values.settings.pricing -}}
{{- if and $pricing.node_type $pricing.node_price_per_hour (not (hasKey $pricing.node_price_per_hour $pricing.node_type)) -}}
{{- fail (printf "settings.pricing.node_type %q has no price in settings.pricing.node_price_per_hour (%s)" $pricing.node_type (keys $pricing.node_price_per_hour | sortAlpha | join ", ")) -}}
{{- end -}}
{{- range $name, $group := .Values.ray.workerGroups -}}
{{- if and $group.enabled (or (gt (int $group.minReplicas) (int $group.maxReplicas)) (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas))) -}}
{{- fail (printf "ray.workerGroups.%s: need minReplicas <= replicas <= maxReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Environment every Ray container gets besides the settings ConfigMap: HOME on the writable /tmp,
the settings that are secrets (only as secretKeyRef, never values) and the object store's
endpoint, region and keys (keys as secretKeyRef).
*/}}
{{- define "calm-stream.env" -}}
- name: HOME
  value: /tmp
{{- with .Values.kafkaCredentials.saslPassword }}
{{- if .secretName }}
- name: CALM_STREAM_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.kafkaCredentials.sslKeyPassword }}
{{- if .secretName }}
- name: CALM_STREAM_KAFKA__SSL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.storage.objectStore }}
{{- if .uri }}
{{- if .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- end }}
{{- if .region }}
- name: AWS_REGION
  value: {{ .region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .credentialsSecret.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .credentialsSecret.name }}
      key: {{ .credentialsSecret.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .credentialsSecret.name }}
      key: {{ .credentialsSecret.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: /tmp, the data PVC, the Kafka TLS files. */}}
{{- define "calm-stream.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "calm-stream.pvcName" . }}
{{- if .Values.kafkaCredentials.tls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafkaCredentials.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "calm-stream.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ .Values.storage.mountPath }}
{{- if .Values.kafkaCredentials.tls.secretName }}
- name: kafka-tls
  mountPath: {{ include "calm-stream.kafkaTlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The settings ConfigMap as a calm-stream container's envFrom. */}}
{{- define "calm-stream.envFrom" -}}
- configMapRef:
    name: {{ include "calm-stream.settingsConfigMap" . }}
{{- end -}}

{{/*
Pod-level scheduling and security of a Ray pod; pass (dict "root" $ "spec" <group values> "component" <name>).
A spread constraint without labelSelector gets the component's own pod labels.
*/}}
{{- define "calm-stream.podSpecCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "calm-stream.serviceAccountName" $root }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .spec.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  {{- $constraint := deepCopy . }}
  {{- if not (hasKey $constraint "labelSelector") }}
  {{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "calm-stream.componentSelectorLabels" (dict "root" $root "component" $.component) | fromYaml)) }}
  {{- end }}
  - {{- toYaml $constraint | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* A command line for a shell, quoted as Python's shlex.quote does: an argument with anything
beyond [A-Za-z0-9_@%+=:,./-] goes in single quotes (' inside becomes '\''). */}}
{{- define "calm-stream.shellJoin" -}}
{{- $quoted := list -}}
{{- range . -}}
{{- $arg := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_@%+=:,./-]+$" $arg -}}
{{- $quoted = append $quoted $arg -}}
{{- else -}}
{{- $quoted = append $quoted (printf "'%s'" (replace "'" "'\\''" $arg)) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/*
The pipeline's Prometheus endpoint is served by its sink actor, on whichever Ray node Ray places it
(usually the head, beside the driver), so every Ray container declares the port.
*/}}
{{- define "calm-stream.calmMetricsPort" -}}
{{- if and .Values.pipeline.enabled .Values.settings.metrics.port -}}
- name: calm-metrics
  containerPort: {{ int .Values.settings.metrics.port }}
{{- end -}}
{{- end -}}

{{/* The ports of a Ray head container (KubeRay's defaults, named for the Services and policies). */}}
{{- define "calm-stream.rayHeadPorts" -}}
- name: gcs
  containerPort: 6379
- name: dashboard
  containerPort: 8265
- name: client
  containerPort: 10001
- name: metrics
  containerPort: 8080
{{- end -}}
