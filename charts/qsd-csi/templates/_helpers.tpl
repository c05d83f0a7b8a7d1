{{/* Names and labels shared by every object of the chart. */}}
{{- define "qsd-csi.name" -}}qsd-csi{{- end -}}

{{- define "qsd-csi.fullname" -}}
{{- if contains "qsd-csi" .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-qsd-csi" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "qsd-csi.labels" -}}
app.kubernetes.io/name: {{ include "qsd-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "qsd-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "qsd-csi.qsdImage" -}}
{{ .Values.qsdImage.repository }}:{{ .Values.qsdImage.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The agent CA's Secret: its certificate and key, and the controller's certificate and key.
Mounted in the controller pod only. */}}
{{- define "qsd-csi.caSecret" -}}{{ include "qsd-csi.fullname" . }}-agent-ca{{- end -}}
{{/* The ConfigMap with the CA certificate alone: what a node trusts. */}}
{{- define "qsd-csi.caBundle" -}}{{ include "qsd-csi.fullname" . }}-agent-ca-bundle{{- end -}}
{{/* cert-manager: the controller's client certificate. */}}
{{- define "qsd-csi.controllerSecret" -}}{{ include "qsd-csi.fullname" . }}-controller-tls{{- end -}}

{{/* A sidecar's image: the value if set, else the tested one from versions.yaml. */}}
{{- define "qsd-csi.sidecarImage" -}}
{{- $v := index (.root.Files.Get "versions.yaml" | fromYaml).sidecars .name -}}
{{- (index .root.Values.sidecars .name).image | default (printf "%s:%s" $v.image $v.version) -}}
{{- end -}}

{{/* Where pods reach the API server, when not through the in-cluster Service: environment
entries overriding the kubelet's KUBERNETES_SERVICE_HOST/PORT (empty when unset). */}}
{{- define "qsd-csi.apiServerEnv" -}}
{{- with .Values.kubernetesAPI -}}
{{- if and .host .port -}}
- { name: KUBERNETES_SERVICE_HOST, value: {{ .host | quote }} }
- { name: KUBERNETES_SERVICE_PORT, value: {{ .port | quote }} }
{{- else if or .host .port -}}
{{- fail "kubernetesAPI: set both host and port, or neither" -}}
{{- end -}}
{{- end -}}
{{- end -}}
