{{/*
The agent's environment: one variable per setting of the README's
configuration table (and the scheduler link), from .Values.config,
.Values.tls and .Values.scheduler. A YAML list of EnvVar; the DaemonSet
drops the names that extraEnv sets.
*/}}
{{- define "persys-agent.env" -}}
- name: NODE_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: PERSYS_GRPC_ADDR
  value: {{ .Values.config.grpcAddr | quote }}
- name: PERSYS_GRPC_PORT
  value: {{ .Values.config.grpcPort | int64 | quote }}
- name: PERSYS_TLS_ENABLED
  value: {{ .Values.tls.enabled | quote }}
- name: PERSYS_TLS_CERT
  value: {{ printf "%s/agent.crt" (trimSuffix "/" .Values.tls.mountPath) | quote }}
- name: PERSYS_TLS_KEY
  value: {{ printf "%s/agent.key" (trimSuffix "/" .Values.tls.mountPath) | quote }}
- name: PERSYS_TLS_CA
  value: {{ printf "%s/ca.crt" (trimSuffix "/" .Values.tls.mountPath) | quote }}
- name: PERSYS_STATE_PATH
  value: {{ .Values.config.statePath | quote }}
{{- with .Values.config.stateKeyFile }}
- name: PERSYS_STATE_KEY_FILE
  value: {{ . | quote }}
{{- end }}
- name: PERSYS_LOG_MAX_ENTRIES
  value: {{ .Values.config.logMaxEntries | int64 | quote }}
- name: PERSYS_LOG_MAX_AGE
  value: {{ .Values.config.logMaxAge | quote }}
- name: PERSYS_DOCKER_ENABLED
  value: {{ .Values.config.docker.enabled | quote }}
- name: DOCKER_HOST
  value: {{ .Values.config.docker.host | quote }}
- name: PERSYS_COMPOSE_ENABLED
  value: {{ .Values.config.compose.enabled | quote }}
{{- with .Values.config.compose.binary }}
- name: PERSYS_COMPOSE_BINARY
  value: {{ . | quote }}
{{- end }}
- name: PERSYS_COMPOSE_TIMEOUT
  value: {{ .Values.config.compose.timeout | quote }}
- name: PERSYS_VM_ENABLED
  value: {{ .Values.config.vm.enabled | quote }}
- name: PERSYS_LIBVIRT_URI
  value: {{ .Values.config.vm.libvirtUri | quote }}
- name: PERSYS_VM_STOP_TIMEOUT
  value: {{ .Values.config.vm.stopTimeout | quote }}
{{- with .Values.config.vm.domainType }}
- name: PERSYS_VM_DOMAIN_TYPE
  value: {{ . | quote }}
{{- end }}
- name: PERSYS_RECONCILE_ENABLED
  value: {{ .Values.config.reconcile.enabled | quote }}
- name: PERSYS_RECONCILE_INTERVAL
  value: {{ .Values.config.reconcile.interval | quote }}
{{- with .Values.config.allowedHostPaths }}
- name: PERSYS_ALLOWED_HOST_PATHS
  value: {{ join "," . | quote }}
{{- end }}
- name: PERSYS_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: PERSYS_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: PERSYS_NODE_ID
  {{- if .Values.config.nodeId }}
  value: {{ .Values.config.nodeId | quote }}
  {{- else }}
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
  {{- end }}
{{- with .Values.config.version }}
- name: PERSYS_VERSION
  value: {{ . | quote }}
{{- end }}
- name: PERSYS_METRICS_PORT
  value: {{ .Values.config.metricsPort | int64 | quote }}
{{- with .Values.scheduler.addr }}
- name: PERSYS_SCHEDULER_ADDR
  value: {{ . | quote }}
{{- end }}
{{- if include "persys-agent.schedulerClientMounted" . }}
- name: PERSYS_SCHEDULER_TLS_CERT
  value: {{ printf "%s/scheduler-client.crt" (trimSuffix "/" .Values.tls.mountPath) | quote }}
- name: PERSYS_SCHEDULER_TLS_KEY
  value: {{ printf "%s/scheduler-client.key" (trimSuffix "/" .Values.tls.mountPath) | quote }}
{{- end }}
{{- if .Values.authz.policy }}
- name: PERSYS_AUTHZ_FILE
  value: {{ printf "%s/policy.yaml" (trimSuffix "/" .Values.authz.mountPath) | quote }}
{{- end }}
{{- if .Values.workloadPolicy.policy }}
- name: PERSYS_POLICY_FILE
  value: {{ printf "%s/policy.yaml" (trimSuffix "/" .Values.workloadPolicy.mountPath) | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.scheduler.insecure) }}
- name: PERSYS_SCHEDULER_INSECURE
  value: {{ .Values.scheduler.insecure | quote }}
{{- end }}
{{- with .Values.scheduler.agentGrpcEndpoint }}
- name: PERSYS_AGENT_GRPC_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.scheduler.clusterId }}
- name: PERSYS_CLUSTER_ID
  value: {{ . | quote }}
{{- end }}
{{- with .Values.scheduler.nodeLabels }}
- name: PERSYS_NODE_LABELS
  value: {{ include "persys-agent.nodeLabels" . | quote }}
{{- end }}
{{- with .Values.scheduler.nodeRegion }}
- name: PERSYS_NODE_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.scheduler.nodeEnv }}
- name: PERSYS_NODE_ENV
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
A label map as key=value pairs joined with commas (sorted keys).
*/}}
{{- define "persys-agent.nodeLabels" -}}
{{- $pairs := list }}
{{- range $k := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%v" $k (get $ $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
