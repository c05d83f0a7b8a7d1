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

{{- define "qsd-csi.tlsSecret" -}}{{ include "qsd-csi.fullname" . }}-tls{{- end -}}

{{/* The agent TLS volume of a component ("controller" or "node"), with the same three files
(ca.crt, tls.crt, tls.key) whichever source made them. */}}
{{- define "qsd-csi.tlsVolume" -}}
- name: agent-tls
  secret:
    defaultMode: 0400
{{- if eq .root.Values.tls.source "helm" }}
    secretName: {{ include "qsd-csi.tlsSecret" .root }}
    items:
      - { key: ca.crt, path: ca.crt }
      - { key: {{ .who }}.crt, path: tls.crt }
      - { key: {{ .who }}.key, path: tls.key }
{{- else }}
    secretName: {{ include "qsd-csi.tlsSecret" .root }}-{{ .who }}
{{- end }}
{{- end -}}

{{- define "qsd-csi.tlsArgs" -}}
- --tls-cert=/etc/qsd-csi/tls/tls.crt
- --tls-key=/etc/qsd-csi/tls/tls.key
- --tls-ca=/etc/qsd-csi/tls/ca.crt
{{- end -}}
