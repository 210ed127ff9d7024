{{- define "signpost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "signpost.fullname" -}}
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

{{- define "signpost.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "signpost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "signpost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "signpost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "signpost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "signpost.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "signpost.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- /* TOML values. Strings as JSON strings (valid TOML basic strings);
numbers may arrive as float64 from YAML, so integers are printed as integers
and floats always with a fraction (TOML's 20 is not a float). */ -}}
{{- define "signpost.toml.str" -}}{{ toJson (toString .) }}{{- end }}
{{- define "signpost.toml.int" -}}{{ int64 . }}{{- end }}
{{- define "signpost.toml.float" -}}
{{- $f := float64 . }}{{ if eq (floor $f) $f }}{{ printf "%d.0" (int64 $f) }}{{ else }}{{ $f }}{{ end }}
{{- end }}

{{- /* The Secret of the controller's TLS files (tls.crt, tls.key, ca.crt):
security.tls.secretName, else, with the cert-manager Certificate
(security.tls.certManager.enabled), the release's full name + "-tls", which
that Certificate writes. Empty: no TLS. */ -}}
{{- define "signpost.tlsSecretName" -}}
{{- $tls := .Values.security.tls }}
{{- if $tls.secretName }}
{{- $tls.secretName }}
{{- else if $tls.certManager.enabled }}
{{- printf "%s-tls" (include "signpost.fullname" .) }}
{{- end }}
{{- end }}
