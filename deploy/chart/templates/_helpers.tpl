{{/* The chart's name, and the release's objects' name (the release name when it holds it). */}}
{{- define "netpol.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "netpol.fullname" -}}
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

{{- define "netpol.selectorLabels" -}}
app.kubernetes.io/name: {{ include "netpol.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "netpol.labels" -}}
{{ include "netpol.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "netpol.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "netpol.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The daemon's image: a versioned tag, the chart's appVersion unless set. */}}
{{- define "netpol.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the pins live; refuses a directory outside the bpffs mount. */}}
{{- define "netpol.pinDir" -}}
{{- if not (hasPrefix "/sys/fs/bpf/" .Values.bpffs.pinDir) }}
{{- fail (printf "bpffs.pinDir %q: must be under /sys/fs/bpf/ (the host's bpffs is mounted there)" .Values.bpffs.pinDir) }}
{{- end }}
{{- .Values.bpffs.pinDir }}
{{- end }}

{{/* `netpol-daemon run` and its flags, one value each. */}}
{{- define "netpol.args" -}}
{{- $d := .Values.daemon -}}
- run
- --metrics-addr={{ .Values.metrics.address }}:{{ .Values.metrics.port }}
- --bpffs={{ include "netpol.pinDir" . }}
{{- if $d.manifestsHostPath }}
- --manifests=/etc/netpol/manifests
{{- end }}
- --established={{ $d.established }}
- --ct-tcp-timeout={{ int64 $d.conntrack.tcpTimeoutSeconds }}
- --ct-udp-timeout={{ int64 $d.conntrack.udpTimeoutSeconds }}
- --ct-other-timeout={{ int64 $d.conntrack.otherTimeoutSeconds }}
- --flow-cache={{ ternary "on" "off" $d.flowCache }}
- --log-denied={{ int64 $d.logDenied }}
- --poll-ms={{ int64 $d.pollMs }}
- --crd-recheck-ms={{ int64 .Values.clusterNetworkPolicy.crdRecheckMs }}
- --liveness-timeout={{ int64 $d.livenessTimeoutSeconds }}
- --attach={{ $d.attach }}
- --log-format={{ $d.logFormat }}
{{- if $d.audit }}
- --audit
{{- end }}
{{- if $d.allowPrivateBpffs }}
- --allow-private-bpffs
{{- end }}
{{- if $d.bpfDebug }}
- --bpf-debug
{{- end }}
{{- range $d.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Scheduling of the per-node pods (the daemon's and the uninstall's): every Linux node. */}}
{{- define "netpol.nodeScheduling" -}}
priorityClassName: {{ .Values.priorityClassName }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The daemon's capabilities: load programs and maps (BPF, PERFMON), attach to interfaces
(NET_ADMIN). No SYS_ADMIN: the init container mounts bpffs. */}}
{{- define "netpol.securityContext" -}}
runAsUser: 0
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
  add: [BPF, NET_ADMIN, PERFMON]
{{- end }}

{{/* The host's bpffs, seen by the daemon with HostToContainer propagation (a bpffs the init
container or the host mounts later is seen too). */}}
{{- define "netpol.bpffsMount" -}}
- name: bpffs
  mountPath: /sys/fs/bpf
  mountPropagation: HostToContainer
{{- end }}

{{- define "netpol.bpffsVolume" -}}
- name: bpffs
  hostPath:
    path: {{ .Values.bpffs.hostPath }}
    type: DirectoryOrCreate
{{- end }}

{{/* Mounts bpffs on the host when the node has none there (as Cilium's mount-bpf-fs): the
only privileged container, since Bidirectional propagation (the mount reaching the host)
requires it. /proc/mounts, not `mount`: the same in every image. */}}
{{- define "netpol.mountBpffs" -}}
- name: mount-bpffs
  image: {{ include "netpol.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [/bin/sh, -c]
  args:
    - grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
  securityContext:
    privileged: true
  terminationMessagePolicy: FallbackToLogsOnError
  volumeMounts:
    - name: bpffs
      mountPath: /sys/fs/bpf
      mountPropagation: Bidirectional
{{- end }}

{{- define "netpol.uninstallName" -}}
{{- printf "%s-uninstall" (include "netpol.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The DaemonSet the uninstall Job applies: on every node the daemon ran on, an init
container runs `netpol-daemon uninstall` (removing the pinned links detaches the programs),
then the pod idles so that `kubectl rollout status` can tell every node is done. */}}
{{- define "netpol.uninstallDaemonSet" -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "netpol.uninstallName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    app.kubernetes.io/name: {{ include "netpol.uninstallName" . }}
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: {{ include "netpol.uninstallName" . }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {{ include "netpol.uninstallName" . }}
    spec:
      hostNetwork: true
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 1
      {{- include "netpol.nodeScheduling" . | nindent 6 }}
      initContainers:
        - name: uninstall
          image: {{ include "netpol.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args:
            - uninstall
            - --bpffs={{ include "netpol.pinDir" . }}
          securityContext:
            {{- include "netpol.securityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "netpol.bpffsMount" . | nindent 12 }}
      containers:
        - name: done
          image: {{ include "netpol.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: [/bin/sleep, infinity]
          resources:
            requests:
              cpu: 1m
              memory: 4Mi
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: [ALL]
      volumes:
        {{- include "netpol.bpffsVolume" . | nindent 8 }}
{{- end }}

{{/* What every kubectl step of the uninstall Job shares: API calls only, no privilege; a
writable HOME for kubectl's discovery cache on a read-only root. Ends with volumeMounts (a step
may add its own). */}}
{{- define "netpol.kubectlContainer" -}}
env:
  - name: HOME
    value: /home/kubectl
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
volumeMounts:
  - name: home
    mountPath: /home/kubectl
{{- end }}

{{- /*
How the monitors label what they scrape: the daemon's own `namespace` and `pod` labels (the
pod a count is about) win over the target's (honorLabels), and each series gets the node it
came from as `node` (the dashboard's node variable).
*/}}
{{- define "netpol.scrapeLabels" -}}
honorLabels: true
relabelings:
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- end }}
