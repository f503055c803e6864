{{/* Names and labels shared by every template. */}}

{{- define "tenancy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: cluster-scoped objects (ClusterRole, binding) carry it, so two releases never collide. */}}
{{- define "tenancy-operator.fullname" -}}
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

{{- define "tenancy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tenancy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tenancy-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tenancy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tenancy-operator
{{- end -}}

{{- define "tenancy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tenancy-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tenancy-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tenancy-operator.peeringName" -}}
{{- default (include "tenancy-operator.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* Sharded replicas' Lease name prefix and tenancy.dev/shard-group label (TENANCY_SHARD_GROUP). */}}
{{- define "tenancy-operator.shardGroup" -}}
{{- include "tenancy-operator.fullname" . -}}
{{- end -}}

{{/* What values.schema.json cannot say about sharding: checks across values, with a message
that names them (deployment.yaml includes it, so every render runs it). */}}
{{- define "tenancy-operator.checkSharding" -}}
{{- with .Values.sharding -}}
{{- if .enabled -}}
{{- if $.Values.peering.enabled -}}
{{- fail "sharding.enabled and peering.enabled exclude each other: sharded replicas share the fleet, peered ones stand by" -}}
{{- end -}}
{{- if and (lt (int .slices) (int .replicas)) (ne (int .slices) 1) -}}
{{- fail (printf "sharding.slices (%d) must be at least sharding.replicas (%d), or 1 for active/standby: a replica without a slice has nothing to do" (int .slices) (int .replicas)) -}}
{{- end -}}
{{- if and (not (kindIs "invalid" $.Values.terminationGracePeriodSeconds)) (le (int $.Values.terminationGracePeriodSeconds) (int .leaseSeconds)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed sharding.leaseSeconds (%d)" (int $.Values.terminationGracePeriodSeconds) (int .leaseSeconds)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tenancy-operator.archiveClaim" -}}
{{- default (printf "%s-archive" (include "tenancy-operator.fullname" .)) .Values.archive.existingClaim -}}
{{- end -}}

{{/* The rules the operator needs in each namespace it serves: the namespaced mode's Role in each
watched namespace, and the ClusterRole of the cluster mode. */}}
{{- define "tenancy-operator.namespaceRules" -}}
# Kopf watches our kinds and patches its finalizer and progress annotations on them.
- apiGroups: [tenancy.dev]
  resources: [tenants, featureflags, schemarollouts]
  verbs: [get, list, watch, patch]
# TenantArchives: the operator creates one per archive and deletes it when retention purges the
# archive (its finalizer is the purge on a user's deletion).
- apiGroups: [tenancy.dev]
  resources: [tenantarchives]
  verbs: [get, list, watch, patch, create, delete]
# Quotas: besides their status, the operator writes one label (tenancy.dev/slice, sharded replicas).
- apiGroups: [tenancy.dev]
  resources: [quotas]
  verbs: [get, list, watch, patch]
# Conditions, phase, observedGeneration.
- apiGroups: [tenancy.dev]
  resources: [tenants/status, quotas/status, featureflags/status, schemarollouts/status, tenantarchives/status]
  verbs: [patch]
# Events for user-relevant transitions; patch: a repeat counts on the Event already posted.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# Tenant credentials: read, create, rotate (replace), delete; the sweep lists them.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, create, update, delete]
# Schema templates (read, and watched so a changed template migrates its tenants) and the
# flagd ConfigMap of each FeatureFlag (create, replace, delete).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, update, delete]
{{- end -}}
