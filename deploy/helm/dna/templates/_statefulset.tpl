{{/* One role's StatefulSet: call with (dict "root" $ "role" "bootstrap"|"storage"). Both
     roles run the same way: config from a ConfigMap, the pod IP as the node's address,
     /data on a volume, /tmp in memory, everything else read-only. */}}
{{- define "dna.statefulset" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := index $root.Values $role -}}
{{- $command := ternary "dna-storage-node" "dna-bootstrap" (eq $role "storage") -}}
{{- $prefix := ternary "DNA_STORAGE" "DNA_BOOTSTRAP" (eq $role "storage") -}}
{{- $persistent := or (eq $role "storage") $v.persistence.enabled -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "dna.roleName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dna.roleLabels" . | nindent 4 }}
spec:
  serviceName: {{ include "dna.headlessName" . }}
  replicas: {{ $v.replicas }}
  # Parallel: bootstrap nodes list each other, so none may wait for another to be ready
  # first; and an OrderedReady set cannot roll back from a broken pod
  # (kubernetes/kubernetes#67250).
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      partition: {{ ternary $v.partition 0 (eq $role "storage") }}
  selector:
    matchLabels:
      {{- include "dna.roleSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "dna.roleLabels" . | nindent 8 }}
      annotations:
        checksum/config: {{ include "dna.toml" . | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "dna.serviceAccountName" $root }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: {{ $root.Values.runAsUser }}
        runAsGroup: {{ $root.Values.runAsGroup }}
        fsGroup: {{ $root.Values.runAsGroup }}
        fsGroupChangePolicy: OnRootMismatch
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: {{ $role }}
          image: {{ include "dna.image" . | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ $command | quote }}, "run", "--config", "/etc/dna/node.toml"]
          env:
            # The node binds and advertises its pod IP; the ops port too (probes and
            # Prometheus reach the pod IP).
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            - name: {{ $prefix }}__NODE__HOST
              value: "$(POD_IP)"
            - name: {{ $prefix }}__OPS__HTTP_HOST
              value: "$(POD_IP)"
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: overlay
              containerPort: {{ $root.Values.ports.udp }}
              protocol: UDP
            - name: grpc
              containerPort: {{ $root.Values.ports.grpc }}
              protocol: TCP
            - name: http
              containerPort: {{ $root.Values.ports.http }}
              protocol: TCP
          startupProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            privileged: false
            capabilities:
              drop: [ALL]
          volumeMounts:
            - {name: config, mountPath: /etc/dna, readOnly: true}
            - {name: data, mountPath: /data}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - name: config
          configMap:
            name: {{ include "dna.roleName" . }}
        - name: tmp
          emptyDir:
            medium: Memory
            sizeLimit: 64Mi
        {{- if not $persistent }}
        - name: data
          emptyDir: {}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- if $persistent }}
  volumeClaimTemplates:
    - metadata:
        name: data
        labels:
          {{- include "dna.roleSelectorLabels" . | nindent 10 }}
      spec:
        accessModes: {{ toJson (default (list "ReadWriteOnce") $v.persistence.accessModes) }}
        {{- with $v.persistence.storageClassName }}
        storageClassName: {{ . | quote }}
        {{- end }}
        resources:
          requests:
            storage: {{ $v.persistence.size | quote }}
  {{- end }}
{{- end -}}
