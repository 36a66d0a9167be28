{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "persys-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the
chart name; truncated to 63 characters.
*/}}
{{- define "persys-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label value: <name>-<version>.
*/}}
{{- define "persys-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of the release (a DaemonSet's selector
cannot change).
*/}}
{{- define "persys-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "persys-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels (Helm best practice, app.kubernetes.io/*).
*/}}
{{- define "persys-agent.labels" -}}
helm.sh/chart: {{ include "persys-agent.chart" . }}
{{ include "persys-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ include "persys-agent.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: persys
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "persys-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "persys-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image tag (defaults to the chart's appVersion) and reference.
*/}}
{{- define "persys-agent.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "persys-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "persys-agent.imageTag" .) }}
{{- end }}

{{/*
The Secret holding the server certificate: the cert-manager Certificate's, or
the existing one.
*/}}
{{- define "persys-agent.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled }}
{{- default (printf "%s-tls" (include "persys-agent.fullname" .)) .Values.tls.certManager.secretName }}
{{- else }}
{{- .Values.tls.existingSecret }}
{{- end }}
{{- end }}

{{/*
Whether the agent dials the scheduler over mutual TLS (an address, and
scheduler.insecure not true).
*/}}
{{- define "persys-agent.schedulerTls" -}}
{{- if and .Values.scheduler.addr (not .Values.scheduler.insecure) }}true{{ end }}
{{- end }}

{{/*
The Secret holding the scheduler client certificate: the cert-manager
Certificate's, the existing one, or "" (none configured).
*/}}
{{- define "persys-agent.schedulerClientSecretName" -}}
{{- $sc := .Values.tls.schedulerClient }}
{{- if $sc.certManager.enabled }}
{{- default (printf "%s-scheduler-client-tls" (include "persys-agent.fullname" .)) $sc.certManager.secretName }}
{{- else }}
{{- $sc.existingSecret }}
{{- end }}
{{- end }}

{{/*
Whether the scheduler client certificate is mounted (TLS on, and a source).
*/}}
{{- define "persys-agent.schedulerClientMounted" -}}
{{- if and .Values.tls.enabled (include "persys-agent.schedulerClientSecretName" .) }}true{{ end }}
{{- end }}

{{/*
Probe mode actually used: "auto" resolves to http with TLS, grpc without.
*/}}
{{- define "persys-agent.probeMode" -}}
{{- if eq .Values.probes.mode "auto" }}
{{- if .Values.tls.enabled }}http{{ else }}grpc{{ end }}
{{- else }}
{{- .Values.probes.mode }}
{{- end }}
{{- end }}

{{/*
Whether the Docker socket is needed (Docker or Compose enabled).
*/}}
{{- define "persys-agent.needsDocker" -}}
{{- if or .Values.config.docker.enabled .Values.config.compose.enabled }}true{{ end }}
{{- end }}

{{/*
Checks of combinations the schema cannot express. Fails the render with a
message naming the values to change.
*/}}
{{- define "persys-agent.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.certManager.enabled) (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled is true: set tls.existingSecret to a Secret with the server certificate, key and CA, or set tls.certManager.enabled=true (or tls.enabled=false for development)" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled is true: set tls.certManager.issuerRef.name (and kind: Issuer or ClusterIssuer)" }}
{{- end }}
{{- /* Every node holds the server (and scheduler client) certificate's key:
  it must not be a name the agents' default policy gives a role, and the
  server certificate must not authenticate clients. */}}
{{- $roleNames := list "persys-scheduler" "persysctl" }}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled (has .Values.tls.certManager.commonName $roleNames) }}
{{- fail (printf "tls.certManager.commonName %s is a name the agents' default policy maps to a role, and every node holds this key: use persys-agent" .Values.tls.certManager.commonName) }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled (has "client auth" .Values.tls.certManager.usages) }}
{{- fail "tls.certManager.usages includes client auth: the agents' server certificate is for serving only (every node holds its key; with client auth one stolen node key would authenticate to every node). The scheduler link uses tls.schedulerClient" }}
{{- end }}
{{- $sc := .Values.tls.schedulerClient }}
{{- if and $sc.certManager.enabled (has $sc.certManager.commonName $roleNames) }}
{{- fail (printf "tls.schedulerClient.certManager.commonName %s is a name the agents' default policy maps to a role, and every node holds this key: use compute-agent" $sc.certManager.commonName) }}
{{- end }}
{{- if and $sc.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.schedulerClient.certManager.enabled is true: set tls.certManager.issuerRef.name (the scheduler client certificate comes from the same issuer)" }}
{{- end }}
{{- if include "persys-agent.schedulerTls" . }}
{{- if not .Values.tls.enabled }}
{{- fail "scheduler.addr is set with mutual TLS (scheduler.insecure is not true) but tls.enabled is false: the CA and the scheduler client certificate are mounted only with tls.enabled (or set scheduler.insecure=true for development)" }}
{{- end }}
{{- if not (include "persys-agent.schedulerClientSecretName" .) }}
{{- fail "scheduler.addr is set with mutual TLS: set tls.schedulerClient.existingSecret (a client-auth certificate for the agent, e.g. CN compute-agent) or tls.schedulerClient.certManager.enabled=true; the agents' server certificate has no client auth" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.probes.mode "grpc") }}
{{- fail "probes.mode=grpc cannot work with tls.enabled=true: the agent requires a client certificate and the kubelet's gRPC probe cannot present one. Use probes.mode=http (or auto)" }}
{{- end }}
{{- if not (hasPrefix "/" .Values.config.statePath) }}
{{- fail "config.statePath must be an absolute path" }}
{{- end }}
{{- $state := trimSuffix "/" .Values.hostPaths.state.path }}
{{- if not (or (eq .Values.config.statePath $state) (hasPrefix (printf "%s/" $state) .Values.config.statePath)) }}
{{- fail (printf "config.statePath (%s) must lie under hostPaths.state.path (%s), or the agent's state would not survive a pod restart" .Values.config.statePath $state) }}
{{- end }}
{{- $key := default (printf "%s.key" (trimSuffix "/" .Values.config.statePath)) .Values.config.stateKeyFile }}
{{- if not (hasPrefix (printf "%s/" $state) $key) }}
{{- fail (printf "the state key file (%s: config.stateKeyFile, default <config.statePath>.key) must lie under hostPaths.state.path (%s), or a pod restart would lose the key and the agent could not read its state; set config.statePath below hostPaths.state.path (the default /var/lib/persys/state) or config.stateKeyFile" $key $state) }}
{{- end }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" .Values.config.statePath)) $key }}
{{- fail (printf "config.stateKeyFile (%s) must not lie inside config.statePath: a copy of the state directory would carry its key" $key) }}
{{- end }}
{{- end }}

{{/*
Probe timing fields from a values map (only the keys it has).
*/}}
{{- define "persys-agent.probeTiming" -}}
{{- range $key := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "failureThreshold" "successThreshold" }}
{{- if hasKey $ $key }}
{{ $key }}: {{ get $ $key }}
{{- end }}
{{- end }}
{{- end }}
