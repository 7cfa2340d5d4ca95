{{- define "fusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fusion.fullname" -}}
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

{{- define "fusion.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fusion.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fusion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fusion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fusion.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fusion.authSecret" -}}
{{- default (printf "%s-auth" (include "fusion.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The container port, from config.server.bind ("host:port"). */}}
{{- define "fusion.port" -}}
{{- $bind := default "0.0.0.0:8080" .Values.config.server.bind -}}
{{- last (splitList ":" $bind) -}}
{{- end -}}
