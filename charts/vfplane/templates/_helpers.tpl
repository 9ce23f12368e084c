{{/*
Names, labels and the small decisions several templates share.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "vfplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, or the release name, followed by
the chart name unless the release name already contains it. Kept to 45
characters so that "-device-plugin"-length suffixes still fit in 63.
*/}}
{{- define "vfplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vfplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "vfplane.labels" -}}
helm.sh/chart: {{ include "vfplane.chart" . }}
app.kubernetes.io/name: {{ include "vfplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vfplane
{{- end }}

{{/* Selector labels; the caller adds app.kubernetes.io/component. */}}
{{- define "vfplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vfplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Object names. */}}
{{- define "vfplane.controller.name" -}}
{{- printf "%s-controller" (include "vfplane.fullname" .) }}
{{- end }}
{{- define "vfplane.node.name" -}}
{{- printf "%s-node" (include "vfplane.fullname" .) }}
{{- end }}
{{- define "vfplane.agent.name" -}}
{{- printf "%s-agent" (include "vfplane.fullname" .) }}
{{- end }}
{{- define "vfplane.webhook.serviceName" -}}
{{- include "vfplane.controller.name" . }}
{{- end }}
{{- define "vfplane.webhook.secretName" -}}
{{- printf "%s-webhook-tls" (include "vfplane.fullname" .) }}
{{- end }}
{{- define "vfplane.webhook.certName" -}}
{{- printf "%s-webhook" (include "vfplane.fullname" .) }}
{{- end }}

{{/* The one image; a digest wins over the tag, the tag defaults to appVersion. */}}
{{- define "vfplane.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Whether cert-manager issues the webhook certificate: "true" or "false".
`auto` follows the presence of the cert-manager.io/v1 API.
*/}}
{{- define "vfplane.certManager" -}}
{{- $mode := toString .Values.webhook.certManager.enabled }}
{{- if eq $mode "auto" }}
{{- .Capabilities.APIVersions.Has "cert-manager.io/v1" | toString }}
{{- else if eq $mode "true" }}
{{- "true" }}
{{- else if eq $mode "false" }}
{{- "false" }}
{{- else }}
{{- fail (printf "webhook.certManager.enabled must be auto, true or false, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* Whether the Prometheus Operator objects are rendered: "true" or "false". */}}
{{- define "vfplane.monitoring" -}}
{{- and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") | toString }}
{{- end }}

{{/*
CEL for the pod webhooks' matchConditions: true when a container or init
container asks for a vfplane.io/ resource in its limits or requests, or,
with dra.enabled, when the pod names any ResourceClaim (which claims ask for
vfplane's VFs only the claims themselves say: the webhook reads them). Every
other pod never reaches the webhook, whatever its failurePolicy.
*/}}
{{- define "vfplane.podMatchCondition" -}}
{{- $asks := "has(c.resources) && ((has(c.resources.limits) && c.resources.limits.exists(k, k.startsWith('vfplane.io/'))) || (has(c.resources.requests) && c.resources.requests.exists(k, k.startsWith('vfplane.io/'))))" -}}
object.spec.containers.exists(c, {{ $asks }}) || (has(object.spec.initContainers) && object.spec.initContainers.exists(c, {{ $asks }})){{ if .Values.dra.enabled }} || (has(object.spec.resourceClaims) && size(object.spec.resourceClaims) > 0){{ end }}
{{- end }}

{{/* The restricted container security context (controller, device plugin). */}}
{{- define "vfplane.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
