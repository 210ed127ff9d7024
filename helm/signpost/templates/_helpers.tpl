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

{{- /* Refuses router values under which the controller would not accept
the routers, naming what to set. Each router pod subscribes as its pod name
($(POD_NAME)), so it needs a credential naming that pod: a token of its own
(router.tokenSecretName, a StatefulSet) or a certificate of its own
(router.certManagerCSI). values.schema.json refuses both at once and a
certificate without an issuer. Takes dict root, controller (the URL the
routers dial), name (the router workload's name). */ -}}
{{- define "signpost.router.checkIdentity" -}}
{{- $v := .root.Values }}
{{- $r := $v.router }}
{{- $csi := $r.certManagerCSI }}
{{- $https := hasPrefix "https://" .controller }}
{{- /* This release's controller: its config is ours to check. */}}
{{- $own := not $r.controllerUrl }}
{{- if and (or $r.tokenSecretName $csi.enabled) (not $https) }}
{{- fail "router.tokenSecretName and router.certManagerCSI need TLS to the controller (security.tls.secretName or security.tls.certManager.enabled, or an https:// router.controllerUrl): a token would cross the network in the clear, and a client certificate is presented only over TLS" }}
{{- end }}
{{- if and $https (not (or $r.tokenSecretName $csi.enabled)) }}
{{- fail "router.enabled with TLS needs a credential for each router pod, naming its pod name (the router's --id): router.tokenSecretName (a Secret with one token per pod; the routers become a StatefulSet) or router.certManagerCSI.enabled (a certificate per pod from cert-manager's csi-driver); without one the controller refuses the routers (401)" }}
{{- end }}
{{- if $r.tokenSecretName }}
{{- if and $own (not $v.security.tokensSecretName) }}
{{- fail "router.tokenSecretName needs security.tokensSecretName: the controller's tokens.toml, with a [[token]] entry per router pod (identity = the pod name, role = \"router\"); see the chart README, \"Router identities\"" }}
{{- end }}
{{- /* The StatefulSet's controller-revision-hash label is its name, a dash
and ten characters, and a label value holds at most 63. */}}
{{- if gt (len .name) 52 }}
{{- fail (printf "router.tokenSecretName makes the routers a StatefulSet, whose name %q must be at most 52 characters; shorten fullnameOverride or the release name" .name) }}
{{- end }}
{{- end }}
{{- if $csi.enabled }}
{{- if and $own (not $v.security.tls.clientAuth) }}
{{- fail "router.certManagerCSI needs security.tls.clientAuth: without it the controller does not ask for client certificates and refuses the routers (401)" }}
{{- end }}
{{- $_ := include "signpost.router.fsGroup" .root }}
{{- end }}
{{- end }}

{{- /* The group the csi-driver gives the router's key and certificate files
(mode 0440): the router container's group (securityContext.runAsGroup, else
podSecurityContext.runAsGroup), else the pod's fsGroup (a supplementary
group of the container), else a refusal: the non-root router could not read
its own key. */ -}}
{{- define "signpost.router.fsGroup" -}}
{{- $p := .Values.podSecurityContext }}
{{- $g := .Values.securityContext.runAsGroup | default $p.runAsGroup | default $p.fsGroup }}
{{- if kindIs "invalid" $g }}
{{- fail "router.certManagerCSI needs podSecurityContext.runAsGroup or fsGroup: the csi-driver makes the key readable by that group only, and the router runs as non-root" }}
{{- end }}
{{- int64 $g }}
{{- end }}
